"""The (K, r) grid of a sweep against its LSQ+SAGM baseline (paper Fig. 6; docs/algorithm.md §6).

    python -m fqat_tf.report runs/pacs_w4 --heatmap fig6.png

For every freezing method of a sweep (FQAT and its freezing ablations, one figure row per
method, quantizer and bit width) each cell holds the mean training-domain validation accuracy
(Val, in-distribution) and the mean test accuracy (Test, out-of-distribution) over the test
domains and seeds of the runs with that freeze interval K and threshold r. A cell is coloured
by its difference against the LSQ+SAGM baseline of the same quantizer and bit widths, averaged
over the same test domains: green above the baseline, red below, white equal. Where a sweep
holds several settings of the other hyperparameters (a learning-rate grid), the one with the
best mean validation accuracy is drawn (`report.best_setting`), for the grid and the baseline
alike; test accuracy never takes part in that choice.
"""
import json

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from fqat_tf import methods
from fqat_tf import plots
from fqat_tf import report

BASELINE = "lsq_sagm"
GRID_KEYS = ("freeze_interval", "freeze_threshold")
_PARTS = (("val", "Val (in-distribution mean)"), ("test", "Test (out-of-distribution mean)"))


def _masked(run):
    method = methods.METHODS.get(run.setting[0])
    return method is not None and method.masked and all(k in run.hparams for k in GRID_KEYS)


def _base_key(run):
    """The run's hyperparameters other than K and r, as canonical JSON."""
    return json.dumps({k: v for k, v in run.hparams.items() if k not in GRID_KEYS},
                      sort_keys=True)


def _means(runs):
    """Mean Val and Test over runs (test groups and seeds), in percent."""
    return {"val": 100.0 * float(np.mean([r.val_avg for r in runs])),
            "test": 100.0 * float(np.mean([np.mean(list(r.test.values())) for r in runs]))}


def _baseline(runs, setting, groups, label):
    """The LSQ+SAGM runs of `setting`'s quantizer and bits over `groups`; refuses a gap."""
    _, quantizer, wbits, abits = setting
    candidates = [r for r in runs if r.setting == (BASELINE, quantizer, wbits, abits)]
    if not candidates:
        raise report.ReportError(
            f"--heatmap: no {BASELINE} baseline at W{wbits}/A{abits} ({quantizer}) for the "
            f"{label} grid; add the LSQ+SAGM runs of the same bits and test domains")
    chosen = report.best_setting([r for r in candidates if r.test_domains in groups]
                                 or candidates)
    missing = sorted("+".join(g) for g in groups - {r.test_domains for r in chosen})
    if missing:
        raise report.ReportError(
            f"--heatmap: the {BASELINE} baseline at W{wbits}/A{abits} ({quantizer}) has no run "
            f"of test domain(s) {missing} that the {label} grid holds")
    chosen = [r for r in chosen if r.test_domains in groups]
    return dict(_means(chosen), hparams=chosen[0].hparams, runs=len(chosen))


def freeze_grids(runs):
    """The (K, r) grids of the freezing methods among `runs`, each with its baseline.

    Args:
        runs: `report.Run`s of one sweep (`report.load_run`).

    Returns:
        A list of dicts, one per (method, quantizer, bits): "label", "bits", "K" and "r" (the
        sorted grid values), "val" and "test" (percent, float arrays [len(K), len(r)], NaN
        where no run), "n" (runs per cell), "hparams" (the other hyperparameters drawn),
        "baseline" ({"val", "test" in percent, "hparams", "runs"}).

    Raises:
        ReportError: no run of a freezing method with K and r, or a grid without an LSQ+SAGM
            baseline of the same bits covering its test domains.
    """
    grid_runs = [r for r in runs if _masked(r)]
    if not grid_runs:
        names = sorted(n for n, m in methods.METHODS.items() if m.masked)
        raise report.ReportError(
            f"--heatmap: no grid runs (runs of {names} with {list(GRID_KEYS)} hparams) among "
            f"the {len(runs)} finished runs")
    families = {}
    for r in grid_runs:
        families.setdefault(r.setting, []).append(r)
    out = []
    for setting, family in sorted(families.items(), key=lambda kv: str(kv[0])):
        family = report.best_setting(family, key=_base_key)
        method, quantizer, wbits, abits = setting
        label = f"{method} ({quantizer})"
        ks = sorted({r.hparams["freeze_interval"] for r in family})
        rs = sorted({r.hparams["freeze_threshold"] for r in family})
        val, test = np.full((len(ks), len(rs)), np.nan), np.full((len(ks), len(rs)), np.nan)
        count = np.zeros((len(ks), len(rs)), dtype=int)
        for i, k in enumerate(ks):
            for j, r_value in enumerate(rs):
                cell = [r for r in family if r.hparams["freeze_interval"] == k
                        and r.hparams["freeze_threshold"] == r_value]
                if cell:
                    means = _means(cell)
                    val[i, j], test[i, j], count[i, j] = means["val"], means["test"], len(cell)
        groups = {r.test_domains for r in family}
        out.append({"label": label, "bits": f"W{wbits}/A{abits}", "K": ks, "r": rs,
                    "val": val, "test": test, "n": count,
                    "hparams": json.loads(_base_key(family[0])),
                    "baseline": _baseline(runs, setting, groups, f"{label} W{wbits}/A{abits}")})
    return out


def plot_freeze_grids(grids, png_path):
    """Draws each grid as two heat maps (Val, Test) coloured by the difference to its baseline.

    Args:
        grids: the list `freeze_grids` returns (at least one).
        png_path: where the PNG goes (written atomically).

    Returns:
        `png_path`.
    """
    if not grids:
        raise report.ReportError("--heatmap: no grid to draw")
    width = max(len(g["r"]) for g in grids)
    height = max(len(g["K"]) for g in grids)
    fig = Figure(figsize=(2 * (2.2 + 1.1 * width), len(grids) * (1.6 + 0.75 * height)),
                 layout="constrained")
    axes = fig.subplots(len(grids), 2, squeeze=False)
    for row, grid in zip(axes, grids):
        for ax, (part, title) in zip(row, _PARTS):
            _panel(fig, ax, grid, part, title)
    return plots.save_figure(fig, png_path)


def _panel(fig, ax, grid, part, title):
    base = grid["baseline"][part]
    diff = grid[part] - base
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    limit = max(limit, 0.05)  # an all-equal grid still gets a readable (white) scale
    image = ax.imshow(np.ma.masked_invalid(diff), cmap="RdYlGn",
                      norm=Normalize(-limit, limit), aspect="auto")
    for i in range(len(grid["K"])):
        for j in range(len(grid["r"])):
            if np.isfinite(grid[part][i, j]):
                ax.text(j, i, f"{grid[part][i, j]:.2f}\n({diff[i, j]:+.2f})", ha="center",
                        va="center", fontsize=8)
            else:
                ax.text(j, i, "no run", ha="center", va="center", fontsize=7, color="0.4")
    ax.set_xticks(range(len(grid["r"])), [f"{r:g}" for r in grid["r"]])
    ax.set_yticks(range(len(grid["K"])), [str(k) for k in grid["K"]])
    ax.set(xlabel="freeze threshold r", ylabel="freeze steps K",
           title=f"{grid['label']} {grid['bits']}: {title}\nvs {BASELINE} {base:.2f} "
                 f"(cell: accuracy %, (difference))")
    fig.colorbar(image, ax=ax, label=f"difference to {BASELINE} (points)", shrink=0.8)
