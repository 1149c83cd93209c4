"""fqat_tf.freeze_grid (paper Fig. 6): cell means against hand computation, the baseline, refusals."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fqat_tf import freeze_grid, plots, report

from helpers import make_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HP = {"lr": 3e-5, "rho": 0.05, "alpha": 0.001}


def _grid_sweep(root, lr=3e-5, shift=0.0):
    """FQAT at K in {300, 350} x r in {0.28, 0.3}, art_painting and sketch, seeds 0 and 23.

    Val of a run = 0.70 + 0.01 * (K == 350) + 0.02 * (r == 0.3) + 0.002 * seed / 23 (+ shift);
    Test = Val - 0.30 on art_painting and Val - 0.20 on sketch.
    """
    for k in (300, 350):
        for r in (0.28, 0.3):
            for domain, gap in (("art_painting", 0.30), ("sketch", 0.20)):
                for seed in (0, 23):
                    val = 0.70 + 0.01 * (k == 350) + 0.02 * (r == 0.3) + 0.002 * seed / 23 + shift
                    make_run(root, f"fqat_lr{lr}__k{k}_r{r}", domain, seed, val, val - gap,
                             hparams=dict(HP, lr=lr, freeze_interval=k, freeze_threshold=r))


def _baseline(root, val=0.71, lr=3e-5):
    for domain, test in (("art_painting", 0.40), ("sketch", 0.50)):
        for seed in (0, 23):
            make_run(root, f"lsq_sagm_lr{lr}", domain, seed, val, test, method="lsq_sagm",
                     hparams=dict(HP, lr=lr))


def _runs(root):
    return [report.load_run(d) for d in report.find_runs([str(root)])]


def test_cells_are_means_over_domains_and_seeds_against_the_baseline(tmp_path):
    _grid_sweep(tmp_path)
    _baseline(tmp_path)
    make_run(tmp_path, "lsq", "art_painting", 0, 0.99, 0.99, method="lsq")  # not a grid run
    (grid,) = freeze_grid.freeze_grids(_runs(tmp_path))
    assert grid["label"] == "fqat (lsq)" and grid["bits"] == "W4/A4"
    assert grid["K"] == [300, 350] and grid["r"] == [0.28, 0.3]
    # Val mean over 2 domains x 2 seeds: base + 0.001 (the seed term's mean), in percent.
    expected_val = 100 * (0.701 + np.array([[0.0, 0.02], [0.01, 0.03]]))
    np.testing.assert_allclose(grid["val"], expected_val, rtol=0, atol=1e-9)
    # Test: Val - mean(0.30, 0.20) = Val - 0.25.
    np.testing.assert_allclose(grid["test"], expected_val - 25.0, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(grid["n"], [[4, 4], [4, 4]])
    assert grid["baseline"]["val"] == pytest.approx(71.0)
    assert grid["baseline"]["test"] == pytest.approx(45.0)
    assert grid["hparams"] == HP


def test_heatmap_draws_each_cell_value_and_difference(tmp_path, monkeypatch):
    _grid_sweep(tmp_path)
    _baseline(tmp_path)
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, p: figures.append(fig) or p)
    grids = freeze_grid.freeze_grids(_runs(tmp_path))
    freeze_grid.plot_freeze_grids(grids, str(tmp_path / "fig6.png"))
    (fig,) = figures
    val_ax, test_ax = [ax for ax in fig.axes if ax.texts]
    # K = 350, r = 0.3: Val 73.1, 2.1 points above LSQ+SAGM's 71; Test 48.1, +3.1 over 45.
    assert "73.10\n(+2.10)" in [t.get_text() for t in val_ax.texts]
    assert "48.10\n(+3.10)" in [t.get_text() for t in test_ax.texts]
    assert "70.10\n(-0.90)" in [t.get_text() for t in val_ax.texts]
    image = val_ax.images[0]
    # The diverging scale is centred on 0: symmetric limits.
    assert image.norm.vmin == -image.norm.vmax


def test_a_learning_rate_grid_draws_the_setting_best_on_validation(tmp_path):
    _grid_sweep(tmp_path, lr=3e-5)
    _grid_sweep(tmp_path, lr=1e-5, shift=0.05)   # better validation: this one is drawn
    _baseline(tmp_path, val=0.71, lr=3e-5)
    _baseline(tmp_path, val=0.60, lr=1e-5)
    (grid,) = freeze_grid.freeze_grids(_runs(tmp_path))
    assert grid["hparams"]["lr"] == 1e-5
    assert grid["val"][0, 0] == pytest.approx(75.1)
    assert grid["baseline"]["val"] == pytest.approx(71.0)  # chosen on its own validation


def test_refusals_name_what_is_missing(tmp_path):
    _baseline(tmp_path / "only_baseline")
    with pytest.raises(report.ReportError, match=r"no grid runs \(runs of \[.*'fqat'"):
        freeze_grid.freeze_grids(_runs(tmp_path / "only_baseline"))
    _grid_sweep(tmp_path / "no_baseline")
    with pytest.raises(report.ReportError, match="no lsq_sagm baseline at W4/A4 .lsq."):
        freeze_grid.freeze_grids(_runs(tmp_path / "no_baseline"))
    _grid_sweep(tmp_path / "gap")
    make_run(tmp_path / "gap", "lsq_sagm", "art_painting", 0, 0.7, 0.4, method="lsq_sagm",
             hparams=HP)
    with pytest.raises(report.ReportError, match=r"no run of test domain\(s\) \['sketch'\]"):
        freeze_grid.freeze_grids(_runs(tmp_path / "gap"))


def test_report_cli_writes_the_heatmap(tmp_path):
    _grid_sweep(tmp_path / "sweep")
    _baseline(tmp_path / "sweep")
    out = tmp_path / "fig6.png"
    proc = subprocess.run([sys.executable, "-m", "fqat_tf.report", str(tmp_path / "sweep"),
                           "--heatmap", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| fqat (lsq) [freeze_interval=300, freeze_threshold=0.28] | 4/4 |" in proc.stdout
