"""The plots of a run directory: gradient disorder (paper Fig. 3) and the freeze timeline (Fig. 4).

Both read `disorder.csv` (`step,variable,disorder,mask`, one row per scale variable per freeze
window; see `fqat_tf.rundir`). The disorder of a row is measured over the window that ends at
its step; the mask of a row is the decision taken at that step, held until the next window.
Every mask is 1 (g_va flows) before the first window.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend or figure
state is touched, and written atomically.
"""
import csv
import io

import numpy as np
from matplotlib import cm, colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from fqat_tf import rundir

_COLUMNS = ("step", "variable", "disorder", "mask")
_MAX_LEGEND = 12          # beyond this many scales, a colour bar replaces the legend
_MAX_TICK_LABELS = 80     # beyond this many scales, the heat maps label every n-th row
_FROZEN, _ACTIVE = "#2c5aa0", "#f2f2f2"


def read_disorder_csv(csv_path):
    """Reads a disorder CSV into step-by-variable matrices.

    Args:
        csv_path: a `disorder.csv` with the columns step, variable, disorder, mask.

    Returns:
        (steps, variables, disorder, mask): the sorted distinct steps (int array [T]), the
        variables in order of first appearance (the model's order), and float arrays [V, T]
        of disorders and masks, NaN where a variable has no row at a step.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column or a value that is not a number, naming file and line.
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {list(_COLUMNS)}")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                records.append((int(float(row["step"])), row["variable"],
                                float(row["disorder"]), _mask_value(row["mask"])))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{csv_path}:{line}: bad row {row} ({e})") from None
    steps = np.array(sorted({r[0] for r in records}), dtype=np.int64)
    variables = list(dict.fromkeys(r[1] for r in records))
    column = {s: i for i, s in enumerate(steps.tolist())}
    row_of = {v: i for i, v in enumerate(variables)}
    disorder = np.full((len(variables), len(steps)), np.nan)
    mask = np.full((len(variables), len(steps)), np.nan)
    for step, variable, d, m in records:
        disorder[row_of[variable], column[step]] = d
        mask[row_of[variable], column[step]] = m
    return steps, variables, disorder, mask


def _mask_value(text):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return float(lowered == "true")
    value = float(text)
    if value not in (0.0, 1.0):
        raise ValueError(f"mask {text!r} is neither 0 nor 1")
    return value


def plot_disorder(csv_path, png_path, threshold=None):
    """Draws the gradient disorder of every scale variable over training (paper Fig. 3).

    Top: one line per scale variable, coloured by its depth in the model. Bottom: the same
    values as a heat map (variables x windows), legible for a ResNet-50's hundred scales.

    Args:
        csv_path: the run's `disorder.csv`.
        png_path: where the PNG goes (written atomically).
        threshold: the freeze threshold r, drawn as a dashed line when given.

    Returns:
        `png_path`. A CSV with no rows yet (a run shorter than one window) gives a figure
        that says so.
    """
    steps, variables, disorder, _ = read_disorder_csv(csv_path)
    if not variables:
        return _save(_empty_figure(csv_path, "Gradient disorder"), png_path)
    fig = Figure(figsize=(10, 4 + _rows_height(len(variables))), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, max(2, _rows_height(len(variables)))))
    colours = _depth_colours(len(variables))
    for i, name in enumerate(variables):
        top.plot(steps, disorder[i], marker="o" if len(steps) < 30 else None, markersize=3,
                 linewidth=1, color=colours[i], label=name)
    if threshold is not None:
        top.axhline(threshold, color="k", linestyle="--", linewidth=1,
                    label=f"threshold r = {threshold:g}")
    top.set(xlabel="step", ylabel="gradient disorder of g_va", ylim=(-0.02, 1.02),
            title=f"Gradient disorder of {len(variables)} scale variables over training")
    top.grid(alpha=0.3)
    if len(variables) <= _MAX_LEGEND:
        top.legend(fontsize=7, loc="best")
    else:
        _depth_colourbar(fig, top, len(variables))
    edges = np.concatenate([[steps[0] - _first_width(steps)], steps]).astype(float)
    mesh = bottom.pcolormesh(edges, np.arange(len(variables) + 1), np.ma.masked_invalid(disorder),
                             cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    fig.colorbar(mesh, ax=bottom, label="disorder")
    _label_rows(bottom, variables)
    bottom.set(xlabel="step (end of each disorder window)")
    return _save(fig, png_path)


def plot_freeze_timeline(csv_path, png_path):
    """Draws the freeze mask of every scale variable over training (paper Fig. 4).

    A heat map of variables x steps: a dark cell is a frozen g_va (mask 0), a light one a
    flowing g_va (mask 1), each decision held from its window's step to the next window.

    Args:
        csv_path: the run's `disorder.csv`.
        png_path: where the PNG goes (written atomically).

    Returns:
        `png_path`. A CSV with no rows yet gives a figure that says so.
    """
    steps, variables, _, mask = read_disorder_csv(csv_path)
    if not variables:
        return _save(_empty_figure(csv_path, "Freeze timeline"), png_path)
    last = steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else max(int(steps[-1]), 1))
    edges, values = np.append(steps, last).astype(float), mask
    if steps[0] > 0:  # every mask starts at 1, before the first window closes
        edges = np.concatenate([[0.0], edges])
        values = np.concatenate([np.ones((len(variables), 1)), mask], axis=1)
    fig = Figure(figsize=(10, 2 + _rows_height(len(variables))), layout="constrained")
    ax = fig.subplots()
    cmap = ListedColormap([_FROZEN, _ACTIVE]).with_extremes(bad="#d62728")
    ax.pcolormesh(edges, np.arange(len(variables) + 1), np.ma.masked_invalid(values), cmap=cmap,
                  vmin=0.0, vmax=1.0, shading="flat", edgecolors="none")
    _label_rows(ax, variables)
    final = mask[:, -1]
    ax.set(xlabel="step", title=f"Freeze timeline: {int(np.sum(final == 0))} of "
                                f"{len(variables)} scales frozen after step {steps[-1]}")
    handles = [Patch(color=_FROZEN, label="frozen (mask 0: only g_flat)"),
               Patch(color=_ACTIVE, label="active (mask 1: g_va + g_flat)")]
    if np.isnan(values).any():
        handles.append(Patch(color="#d62728", label="no record"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, png_path)


def _rows_height(n):
    """Inches of heat map for n variables: readable labels, bounded figure size."""
    return float(np.clip(0.14 * n, 2.0, 24.0))


def _first_width(steps):
    if len(steps) > 1:
        return int(steps[1] - steps[0])
    return max(int(steps[0]), 1)


def _depth_colours(n):
    return colormaps["viridis"](np.linspace(0.0, 1.0, n))


def _depth_colourbar(fig, ax, n):
    mappable = cm.ScalarMappable(Normalize(0, n - 1), colormaps["viridis"])
    bar = fig.colorbar(mappable, ax=ax, label="scale variable (input side -> output side)")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _label_rows(ax, variables):
    every = max(1, -(-len(variables) // _MAX_TICK_LABELS))
    rows = np.arange(0, len(variables), every)
    ax.set_yticks(rows + 0.5)
    ax.set_yticklabels([_short(variables[i]) for i in rows],
                       fontsize=max(4, min(8, int(400 / max(len(rows), 1)))))
    ax.set_ylim(len(variables), 0)  # the first (input-side) scale on top
    ax.set_ylabel("scale variable")


def _short(name, width=48):
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _empty_figure(csv_path, title):
    fig = Figure(figsize=(6, 2))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}: no freeze window completed yet\n({csv_path} has no rows)",
            ha="center", va="center", fontsize=9)
    return fig


def _save(fig, png_path):
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    rundir.atomic_write(png_path, buffer.getvalue(), mode="wb")
    return png_path
