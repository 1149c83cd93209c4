"""The run-directory plots: CSV parsing into matrices, valid PNGs, atomic writes, bad input."""
import os

import numpy as np
import pytest

from fqat_tf import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "step,variable,disorder,mask\n"


def _write(path, rows, header=HEADER):
    with open(path, "w") as f:
        f.write(header + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def _synthetic(n_vars, windows, interval=350, seed=0):
    """Disorder falling with depth and time; frozen (mask 0) where it drops below 0.3."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(1, windows + 1):
        for i in range(n_vars):
            d = float(np.clip(0.5 - 0.4 * (i / n_vars) * (w / windows)
                              + 0.02 * rng.standard_normal(), 0, 1))
            rows.append((w * interval, f"layer{i}/kernel_step", round(d, 4), int(d >= 0.3)))
    return rows


def _assert_png(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def _no_temp_files(folder):
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


def test_read_disorder_csv_builds_step_by_variable_matrices(tmp_path):
    rows = [(300, "b/step", 0.5, 1), (300, "a/step", 0.25, 0),
            (600, "b/step", 0.125, 0), (600, "a/step", 0.75, 1), (900, "b/step", 0.4, "True")]
    steps, variables, disorder, mask = plots.read_disorder_csv(_write(tmp_path / "d.csv", rows))
    np.testing.assert_array_equal(steps, [300, 600, 900])
    assert variables == ["b/step", "a/step"]  # first appearance = model order, not sorted
    np.testing.assert_array_equal(disorder, [[0.5, 0.125, 0.4], [0.25, 0.75, np.nan]])
    np.testing.assert_array_equal(mask, [[1, 0, 1], [0, 1, np.nan]])


@pytest.mark.parametrize("n_vars", [3, 40])  # legend, then colour bar and thinned labels
def test_plots_write_valid_pngs_atomically(tmp_path, n_vars):
    csv_path = _write(tmp_path / "disorder.csv", _synthetic(n_vars, windows=12))
    out = tmp_path / "run"
    out.mkdir()
    disorder_png, timeline_png = str(out / "disorder.png"), str(out / "freeze_timeline.png")
    assert plots.plot_disorder(csv_path, disorder_png, threshold=0.3) == disorder_png
    assert plots.plot_freeze_timeline(csv_path, timeline_png) == timeline_png
    _assert_png(disorder_png)
    _assert_png(timeline_png)
    _no_temp_files(out)
    first = open(timeline_png, "rb").read()
    plots.plot_freeze_timeline(csv_path, timeline_png)  # rewriting replaces the file whole
    assert open(timeline_png, "rb").read()[:8] == PNG_MAGIC
    assert len(os.listdir(out)) == 2 and len(first) > 1000


def test_one_window_and_missing_records_still_plot(tmp_path):
    csv_path = _write(tmp_path / "d.csv", [(350, "a", 0.1, 0), (350, "b", 0.9, 1),
                                           (700, "a", 0.2, 0)])
    plots.plot_disorder(csv_path, str(tmp_path / "d.png"))
    plots.plot_freeze_timeline(csv_path, str(tmp_path / "t.png"))
    single = _write(tmp_path / "s.csv", [(350, "a", 0.1, 0)])
    plots.plot_freeze_timeline(single, str(tmp_path / "s.png"))
    for name in ("d.png", "t.png", "s.png"):
        _assert_png(tmp_path / name)


def test_csv_without_rows_gives_a_placeholder_figure(tmp_path):
    # A run shorter than one freeze window has a header-only CSV; the run must still finish.
    csv_path = _write(tmp_path / "d.csv", [])
    plots.plot_disorder(csv_path, str(tmp_path / "d.png"))
    plots.plot_freeze_timeline(csv_path, str(tmp_path / "t.png"))
    for name in ("d.png", "t.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_bad_csv_is_a_clear_error(tmp_path):
    no_mask = _write(tmp_path / "a.csv", [(1, "v", 0.5)], header="step,variable,disorder\n")
    with pytest.raises(ValueError, match=r"a\.csv: missing column\(s\) \['mask'\]"):
        plots.plot_disorder(no_mask, str(tmp_path / "a.png"))
    bad_number = _write(tmp_path / "b.csv", [(1, "v", 0.5, 1), (2, "v", "lots", 1)])
    with pytest.raises(ValueError, match=r"b\.csv:3: bad row"):
        plots.plot_freeze_timeline(bad_number, str(tmp_path / "b.png"))
    bad_mask = _write(tmp_path / "c.csv", [(1, "v", 0.5, 2)])
    with pytest.raises(ValueError, match="neither 0 nor 1"):
        plots.read_disorder_csv(bad_mask)
    with pytest.raises(FileNotFoundError):
        plots.plot_disorder(str(tmp_path / "absent.csv"), str(tmp_path / "x.png"))
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
