"""The run-directory plots: CSV parsing, what each figure draws, atomic writes, bad input."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fqat_tf import plots, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "step,variable,disorder,mask\n"
FLAT_HEADER = "step,variable,disorder,flat_disorder,mask\n"
GRAD_HEADER = "step,variable,g_va,g_flat,applied\n"


def _write(path, rows, header=HEADER):
    with open(path, "w") as f:
        f.write(header + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def _synthetic(n_vars, windows, interval=350, seed=0, flat=False):
    """Disorder falling with depth and time; frozen (mask 0) where it drops below 0.3."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(1, windows + 1):
        for i in range(n_vars):
            d = float(np.clip(0.5 - 0.4 * (i / n_vars) * (w / windows)
                              + 0.02 * rng.standard_normal(), 0, 1))
            extra = (round(float(rng.uniform(0.4, 0.6)), 4),) if flat else ()
            rows.append((w * interval, f"layer{i}/kernel_step", round(d, 4), *extra,
                         int(d >= 0.3)))
    return rows


def _png_size(path):
    """(width, height) from the PNG header; also checks the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC
    return struct.unpack(">II", head[16:24])


def _no_temp_files(folder):
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


@pytest.fixture
def drawn(monkeypatch):
    """Captures every figure `plots.save_figure` writes, so a test can read what was drawn."""
    figures = []
    original = plots.save_figure

    def capture(fig, png_path):
        figures.append(fig)
        return original(fig, png_path)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


def test_read_disorder_csv_builds_step_by_variable_matrices(tmp_path):
    rows = [(300, "b/step", 0.5, 1), (300, "a/step", 0.25, 0),
            (600, "b/step", 0.125, 0), (600, "a/step", 0.75, 1), (900, "b/step", 0.4, "True")]
    table = plots.read_disorder_csv(_write(tmp_path / "d.csv", rows))
    np.testing.assert_array_equal(table.steps, [300, 600, 900])
    assert table.variables == ["b/step", "a/step"]  # first appearance = model order
    np.testing.assert_array_equal(table.values["disorder"],
                                  [[0.5, 0.125, 0.4], [0.25, 0.75, np.nan]])
    np.testing.assert_array_equal(table.values["mask"], [[1, 0, 1], [0, 1, np.nan]])
    assert "flat_disorder" not in table.values  # an older CSV: g_va only


def test_flat_disorder_is_read_and_drawn_beside_g_va(tmp_path, drawn):
    rows = [(10, "a", 0.2, 0.9, 0), (10, "b", 0.6, 0.7, 1), (20, "a", 0.1, 0.8, 0)]
    csv_path = _write(tmp_path / "d.csv", rows, FLAT_HEADER)
    table = plots.read_disorder_csv(csv_path)
    np.testing.assert_array_equal(table.values["flat_disorder"], [[0.9, 0.8], [0.7, np.nan]])
    plots.plot_disorder(csv_path, str(tmp_path / "flat.png"), threshold=0.3)
    old = _write(tmp_path / "old.csv", [r[:3] + r[4:] for r in rows])
    plots.plot_disorder(old, str(tmp_path / "old.png"))
    # Two columns of panels (g_va, g_flat) against one; the curves drawn are the CSV's.
    with_flat, without = drawn
    assert len(with_flat.axes) > len(without.axes)
    titles = [ax.get_title() for ax in with_flat.axes]
    flat_ax = next(ax for ax in with_flat.axes if ax.get_title().startswith(
        "Gradient disorder of g_flat"))
    np.testing.assert_array_equal(flat_ax.lines[0].get_ydata(), [0.9, 0.8])
    assert not any("g_flat" in ax.get_title() for ax in without.axes)
    assert any("g_va" in t for t in titles)
    assert _png_size(tmp_path / "flat.png")[0] > _png_size(tmp_path / "old.png")[0]


@pytest.mark.parametrize("n_vars", [3, 40])  # legend, then colour bar and thinned labels
def test_plots_write_valid_pngs_atomically(tmp_path, n_vars):
    csv_path = _write(tmp_path / "disorder.csv", _synthetic(n_vars, windows=12, flat=True),
                      FLAT_HEADER)
    out = tmp_path / "run"
    out.mkdir()
    disorder_png, timeline_png = str(out / "disorder.png"), str(out / "freeze_timeline.png")
    assert plots.plot_disorder(csv_path, disorder_png, threshold=0.3) == disorder_png
    assert plots.plot_freeze_timeline(csv_path, timeline_png) == timeline_png
    _png_size(disorder_png)
    _png_size(timeline_png)
    _no_temp_files(out)
    plots.plot_freeze_timeline(csv_path, timeline_png)  # rewriting replaces the file whole
    assert len(os.listdir(out)) == 2


def test_one_window_and_missing_records_still_plot(tmp_path):
    csv_path = _write(tmp_path / "d.csv", [(350, "a", 0.1, 0), (350, "b", 0.9, 1),
                                           (700, "a", 0.2, 0)])
    plots.plot_disorder(csv_path, str(tmp_path / "d.png"))
    plots.plot_freeze_timeline(csv_path, str(tmp_path / "t.png"))
    single = _write(tmp_path / "s.csv", [(350, "a", 0.1, 0)])
    plots.plot_freeze_timeline(single, str(tmp_path / "s.png"))
    for name in ("d.png", "t.png", "s.png"):
        _png_size(tmp_path / name)


def test_gradients_are_drawn_as_cumulative_sums(tmp_path, drawn):
    rows = [(5, "s0", 1.0, -0.5, 0.25), (5, "s1", -2.0, 0.0, 1.0),
            (10, "s0", 0.5, -1.5, 0.0), (10, "s1", 3.0, 1.0, 2.0),
            (15, "s0", -0.25, 2.0, 1.0)]
    csv_path = _write(tmp_path / "gradients.csv", rows, GRAD_HEADER)
    out = str(tmp_path / "gradients.png")
    assert plots.plot_gradients(csv_path, out) == out
    _png_size(out)
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in panels] == ["s0", "s1"]
    va, flat = panels[0].lines[:2]
    np.testing.assert_array_equal(va.get_xdata(), [5, 10, 15])
    np.testing.assert_array_equal(va.get_ydata(), [1.0, 1.5, 1.25])
    np.testing.assert_array_equal(flat.get_ydata(), [-0.5, -2.0, 0.0])
    # s1 has no row at step 15: its sum stays where it was.
    np.testing.assert_array_equal(panels[1].lines[0].get_ydata(), [-2.0, 1.0, 1.0])


def _run(root, name, seed, applied, method="fqat", variables=("s0", "s1")):
    run_dir = root / name
    run_dir.mkdir()
    rundir.write_json(str(run_dir / rundir.FLAGS_JSON), {"seed": seed, "method": method,
                                                         "freeze_threshold": 0.3})
    rows = [(step, v, 0.0, 0.0, applied * (i + 1) * step) for step in (4, 8)
            for i, v in enumerate(variables)]
    _write(run_dir / rundir.GRADIENTS_CSV, rows, GRAD_HEADER)
    return str(run_dir)


def test_compare_draws_each_runs_applied_gradient(tmp_path, drawn):
    fqat = _run(tmp_path, "fqat", 0, 1.0)
    twin = _run(tmp_path, "lsq_sagm", 0, -1.0, method="lsq_sagm", variables=("s1", "s0"))
    out = str(tmp_path / "fig4.png")
    assert plots.plot_compare(fqat, twin, out) == out
    (fig,) = drawn
    s1 = next(ax for ax in fig.axes if ax.get_title() == "s1")
    a, b = s1.lines[:2]
    # s1 is the second variable of the first run and the first of the twin.
    np.testing.assert_array_equal(a.get_ydata(), [8.0, 24.0])
    np.testing.assert_array_equal(b.get_ydata(), [-4.0, -12.0])
    assert a.get_label().startswith("fqat") and b.get_label().startswith("lsq_sagm")


def test_compare_refuses_mismatched_runs(tmp_path):
    fqat = _run(tmp_path, "fqat", 0, 1.0)
    other_seed = _run(tmp_path, "seed23", 23, 1.0)
    with pytest.raises(plots.PlotError, match=r"seed23: seed 23 differs from seed 0"):
        plots.plot_compare(fqat, other_seed, str(tmp_path / "x.png"))
    other_scales = _run(tmp_path, "w3", 0, 1.0, variables=("s0", "t1"))
    with pytest.raises(plots.PlotError, match=r"w3: its scale variables differ"):
        plots.plot_compare(fqat, other_scales, str(tmp_path / "x.png"))
    os.remove(os.path.join(other_seed, rundir.GRADIENTS_CSV))
    with pytest.raises(plots.PlotError, match=r"seed23: no gradients.csv"):
        plots.plot_compare(fqat, other_seed, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_bad_csv_is_a_clear_error(tmp_path):
    no_mask = _write(tmp_path / "a.csv", [(1, "v", 0.5)], header="step,variable,disorder\n")
    with pytest.raises(plots.PlotError, match=r"a\.csv: missing column\(s\) \['mask'\]"):
        plots.plot_disorder(no_mask, str(tmp_path / "a.png"))
    bad_number = _write(tmp_path / "b.csv", [(1, "v", 0.5, 1), (2, "v", "lots", 1)])
    with pytest.raises(plots.PlotError, match=r"b\.csv:3: bad row"):
        plots.plot_freeze_timeline(bad_number, str(tmp_path / "b.png"))
    bad_mask = _write(tmp_path / "c.csv", [(1, "v", 0.5, 2)])
    with pytest.raises(plots.PlotError, match="neither 0 nor 1"):
        plots.read_disorder_csv(bad_mask)
    empty = _write(tmp_path / "e.csv", [], GRAD_HEADER)
    with pytest.raises(plots.PlotError, match=r"e\.csv: no rows"):
        plots.plot_gradients(empty, str(tmp_path / "e.png"))
    with pytest.raises(plots.PlotError, match="absent.csv: no such file"):
        plots.plot_disorder(str(tmp_path / "absent.csv"), str(tmp_path / "x.png"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".png")]


def test_cli_redraws_a_runs_plots(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_json(str(run_dir / rundir.FLAGS_JSON), {"method": "fqat", "seed": 0,
                                                         "freeze_threshold": 0.3})
    _write(run_dir / rundir.DISORDER_CSV, _synthetic(3, 4, flat=True), FLAT_HEADER)
    _write(run_dir / rundir.GRADIENTS_CSV, [(350, "layer0/kernel_step", 1.0, -1.0, 0.0)],
           GRAD_HEADER)
    proc = subprocess.run([sys.executable, "-m", "fqat_tf.plots", "run", str(run_dir)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in (rundir.DISORDER_PNG, rundir.FREEZE_PNG, rundir.GRADIENTS_PNG):
        _png_size(run_dir / name)
        assert f"wrote {run_dir / name}" in proc.stdout
