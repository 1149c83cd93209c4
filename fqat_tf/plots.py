"""The plots of a run directory: the scale gradients and their disorder (paper Fig. 2-5;
docs/algorithm.md §3, §6).

    python -m fqat_tf.plots run RUN_DIR                      # redraw a run's plots from its CSVs
    python -m fqat_tf.plots compare FQAT_RUN LSQ_SAGM_RUN --out fig4.png

`disorder.csv` (`step,variable,disorder,flat_disorder,mask`; runs written before the
flat_disorder column have only g_va's) gives the gradient disorder (Fig. 3) and the freeze
timeline; `gradients.csv` (`step,variable,g_va,g_flat,applied`) gives the cumulative gradients
(Fig. 2 and 5) and the comparison of the applied gradient with and without freezing (Fig. 4).
Formats: `fqat_tf.rundir`. The disorder of a row is measured over the window that ends at its
step; the mask of a row is the decision taken at that step, held until the next window; every
mask is 1 (g_va flows) before the first window.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend or figure
state is touched, and written atomically (rendered in memory, then `rundir.atomic_write`).
"""
import csv
import io
import os
import sys
import typing

import numpy as np
from matplotlib import cm, colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from fqat_tf import cli
from fqat_tf import methods
from fqat_tf import rundir
from fqat_tf.errors import UserError

DISORDER_COLUMNS = ("step", "variable", "disorder", "mask")  # flat_disorder is optional
GRADIENT_COLUMNS = ("step", "variable", "g_va", "g_flat", "applied")
_MAX_LEGEND = 12          # beyond this many scales, a colour bar replaces the legend
_MAX_TICK_LABELS = 80     # beyond this many scales, the heat maps label every n-th row
_FROZEN, _ACTIVE = "#2c5aa0", "#f2f2f2"
_VA, _FLAT = "#1f77b4", "#e6a700"  # the paper's colours: g_va blue, g_flat yellow


class PlotError(UserError):
    """A CSV or run directory that cannot be plotted: missing, empty, malformed, mismatched."""


class Table(typing.NamedTuple):
    """A run CSV as step-by-variable matrices.

    Attributes:
        steps: the sorted distinct steps (int array [T]).
        variables: the scale variables in order of first appearance (the model's order).
        values: column name -> float array [V, T], NaN where a variable has no row at a step.
    """
    steps: np.ndarray
    variables: list
    values: dict


def _read_table(csv_path, required, optional=()):
    """Reads a `step,variable,<numeric columns>` CSV; refuses a missing or empty one."""
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or ()
            missing = [c for c in required if c not in fields]
            if missing:
                raise PlotError(f"{csv_path}: missing column(s) {missing}; expected "
                                f"{list(required)}")
            numeric = [c for c in (*required, *optional) if c in fields][2:]
            records = []
            for line, row in enumerate(reader, start=2):
                try:
                    records.append((int(float(row["step"])), row["variable"],
                                    [_number(c, row[c]) for c in numeric]))
                except (TypeError, ValueError) as e:
                    raise PlotError(f"{csv_path}:{line}: bad row {row} ({e})") from None
    except FileNotFoundError:
        raise PlotError(f"{csv_path}: no such file") from None
    if not records:
        raise PlotError(f"{csv_path}: no rows (the run has not completed a window yet)")
    steps = np.array(sorted({r[0] for r in records}), dtype=np.int64)
    variables = list(dict.fromkeys(r[1] for r in records))
    column = {s: i for i, s in enumerate(steps.tolist())}
    row_of = {v: i for i, v in enumerate(variables)}
    values = {c: np.full((len(variables), len(steps)), np.nan) for c in numeric}
    for step, variable, numbers in records:
        for c, x in zip(numeric, numbers):
            values[c][row_of[variable], column[step]] = x
    return Table(steps, variables, values)


def _number(column, text):
    if column != "mask":
        # An empty cell is a value the run does not have (the g_flat disorder of a one-pass
        # method).
        return float(text) if text.strip() else np.nan
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return float(lowered == "true")
    value = float(text)
    if value not in (0.0, 1.0):
        raise ValueError(f"mask {text!r} is neither 0 nor 1")
    return value


def read_disorder_csv(csv_path):
    """Reads a run's disorder.csv; `values` holds "disorder", "mask" and, when the CSV has the
    column, "flat_disorder". Raises PlotError (naming file and line) on a missing, empty or
    malformed file."""
    return _read_table(csv_path, DISORDER_COLUMNS, optional=("flat_disorder",))


def read_gradients_csv(csv_path):
    """Reads a run's gradients.csv; `values` holds "g_va", "g_flat" and "applied" (window
    sums). Raises PlotError on a missing, empty or malformed file."""
    return _read_table(csv_path, GRADIENT_COLUMNS)


def plot_disorder(csv_path, png_path, threshold=None):
    """Draws the gradient disorder of every scale variable over training (paper Fig. 3).

    One column for g_va and, when the CSV has it, one beside it for g_flat; each with one line
    per scale variable (coloured by depth) above the same values as a heat map (variables x
    windows), legible for a ResNet-50's hundred scales.

    Args:
        csv_path: the run's `disorder.csv`.
        png_path: where the PNG goes (written atomically).
        threshold: the freeze threshold r, drawn as a dashed line when given.

    Returns:
        `png_path`.
    """
    table = read_disorder_csv(csv_path)
    parts = [("disorder", "g_va")] + ([("flat_disorder", "g_flat")]
                                      if "flat_disorder" in table.values else [])
    n = len(table.variables)
    fig = Figure(figsize=(8 * len(parts) + 2, 4 + _rows_height(n)), layout="constrained")
    axes = fig.subplots(2, len(parts), squeeze=False, height_ratios=(3, max(2, _rows_height(n))))
    colours = _depth_colours(n)
    steps = table.steps
    for (column, name), (top, bottom) in zip(parts, axes.T):
        values = table.values[column]
        for i, variable in enumerate(table.variables):
            top.plot(steps, values[i], marker="o" if len(steps) < 30 else None, markersize=3,
                     linewidth=1, color=colours[i], label=variable)
        if threshold is not None and column == "disorder":
            top.axhline(threshold, color="k", linestyle="--", linewidth=1,
                        label=f"threshold r = {threshold:g}")
        top.set(xlabel="step", ylabel=f"gradient disorder of {name}", ylim=(-0.02, 1.02),
                title=f"Gradient disorder of {name}, {n} scale variables")
        top.grid(alpha=0.3)
        if n <= _MAX_LEGEND:
            top.legend(fontsize=7, loc="best")
        else:
            _depth_colourbar(fig, top, n)
        edges = np.concatenate([[steps[0] - _first_width(steps)], steps]).astype(float)
        mesh = bottom.pcolormesh(edges, np.arange(n + 1), np.ma.masked_invalid(values),
                                 cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
        fig.colorbar(mesh, ax=bottom, label=f"disorder of {name}")
        _label_rows(bottom, table.variables)
        bottom.set(xlabel="step (end of each disorder window)")
    return save_figure(fig, png_path)


def plot_freeze_timeline(csv_path, png_path):
    """Draws the freeze mask of every scale variable over training.

    A heat map of variables x steps: a dark cell is a frozen g_va (mask 0), a light one a
    flowing g_va (mask 1), each decision held from its window's step to the next window.

    Args:
        csv_path: the run's `disorder.csv`.
        png_path: where the PNG goes (written atomically).

    Returns:
        `png_path`.
    """
    table = read_disorder_csv(csv_path)
    steps, variables, mask = table.steps, table.variables, table.values["mask"]
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
    return save_figure(fig, png_path)


def plot_gradients(gradients_csv, out_png):
    """Draws the cumulative g_va and g_flat of every scale variable (paper Fig. 2 and 5).

    One panel per scale variable, in model order: the running sum over windows of its
    first-pass gradient g_va (blue) and of its second-pass gradient g_flat (yellow) against
    the step. Curves that run apart in opposite directions are the paper's "sub-optimal
    equilibrium" of the two objectives.

    Args:
        gradients_csv: the run's `gradients.csv`.
        out_png: where the PNG goes (written atomically).

    Returns:
        `out_png`.
    """
    table = read_gradients_csv(gradients_csv)
    series = [("g_va", "cumulative g_va", _VA), ("g_flat", "cumulative g_flat", _FLAT)]
    return _panels(table.variables,
                   lambda i: [(table.steps, np.nancumsum(table.values[c][i]), label, colour)
                              for c, label, colour in series],
                   f"Cumulative scale gradients ({gradients_csv})", out_png)


def plot_compare(run_a, run_b, out_png):
    """Draws the cumulative applied scale gradient of two runs, one panel per scale (Fig. 4).

    The paper compares an FQAT run with its LSQ+SAGM twin (same seed): the gradient each scale
    actually received (`gradients.csv` column `applied`), with and without freezing.

    Args:
        run_a, run_b: run directories holding `gradients.csv` and `flags.json`, of the same
            seed and the same scale variables.
        out_png: where the PNG goes (written atomically).

    Returns:
        `out_png`.

    Raises:
        PlotError: a run without gradients.csv or flags.json, runs of different seeds, or of
            different scale variables, naming the run.
    """
    runs = []
    for run_dir in (run_a, run_b):
        flags = _run_flags(run_dir)
        path = os.path.join(run_dir, rundir.GRADIENTS_CSV)
        if not os.path.isfile(path):
            raise PlotError(f"{run_dir}: no {rundir.GRADIENTS_CSV} (a run without recorded "
                            f"scale gradients cannot be compared)")
        runs.append((run_dir, flags, read_gradients_csv(path)))
    (dir_a, flags_a, a), (dir_b, flags_b, b) = runs
    if flags_a.get("seed") != flags_b.get("seed"):
        raise PlotError(f"{dir_b}: seed {flags_b.get('seed')} differs from seed "
                        f"{flags_a.get('seed')} of {dir_a}; compare twins of one seed")
    if set(a.variables) != set(b.variables):
        only = sorted(set(a.variables) ^ set(b.variables))[:4]
        raise PlotError(f"{dir_b}: its scale variables differ from those of {dir_a} "
                        f"(e.g. {only}); compare runs of one model and bit width")
    label_a = f"{flags_a.get('method', 'A')} ({_short(dir_a, 32)})"
    label_b = f"{flags_b.get('method', 'B')} ({_short(dir_b, 32)})"
    row_b = {v: i for i, v in enumerate(b.variables)}

    def curves(i):
        j = row_b[a.variables[i]]
        return [(a.steps, np.nancumsum(a.values["applied"][i]), label_a, _VA),
                (b.steps, np.nancumsum(b.values["applied"][j]), label_b, _FLAT)]

    return _panels(a.variables, curves,
                   f"Cumulative applied scale gradient, seed {flags_a.get('seed')}", out_png)


_PANEL_WIDTH, _PANEL_HEIGHT, _PANEL_MARGINS = 3.2, 2.2, 1.25  # inches


def _panels(variables, curves, title, png_path):
    """One small panel per variable; `curves(i)` lists its (steps, values, label, colour)."""
    n = len(variables)
    cols = int(min(n, max(1, np.ceil(np.sqrt(n * 1.5)))))
    rows = -(-n // cols)
    width, height = _PANEL_WIDTH * cols, _PANEL_HEIGHT * rows + _PANEL_MARGINS
    # Fixed margins in inches: a constrained layout measures every tick label of every panel
    # first, which took as long as drawing them (a ResNet has 40-110 panels).
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=0.45 / width, right=1 - 0.1 / width, top=1 - 0.5 / height, bottom=0.75 / height,
        wspace=0.3, hspace=0.45)).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.axis("off")
            continue
        for x, y, label, colour in curves(i):
            ax.plot(x, y, color=colour, linewidth=1, label=label)
        ax.axhline(0.0, color="0.6", linewidth=0.5)
        ax.set_title(_short(variables[i], 40), fontsize=7)
        if i >= n - cols:
            ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.locator_params(nbins=4)  # few labels on a small panel (and fewer to draw)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(labels), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return save_figure(fig, png_path)


def _run_flags(run_dir):
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: no such run directory")
    try:
        return rundir.read_json(os.path.join(run_dir, rundir.FLAGS_JSON))
    except (FileNotFoundError, ValueError) as e:
        raise PlotError(f"{run_dir}: not a run directory ({e})") from None


def plot_run(run_dir):
    """(Re)draws a run's disorder, freeze-timeline and gradient plots from its CSVs.

    Returns:
        The paths written.

    Raises:
        PlotError: not a run directory, or neither CSV present.
    """
    flags = _run_flags(run_dir)
    disorder = os.path.join(run_dir, rundir.DISORDER_CSV)
    gradients = os.path.join(run_dir, rundir.GRADIENTS_CSV)
    if not os.path.isfile(disorder) and not os.path.isfile(gradients):
        raise PlotError(f"{run_dir}: neither {rundir.DISORDER_CSV} nor {rundir.GRADIENTS_CSV}; "
                        f"nothing to plot")
    for read, path in ((read_disorder_csv, disorder), (read_gradients_csv, gradients)):
        if os.path.isfile(path):
            read(path)  # both CSVs are checked before the first figure is written
    method = methods.METHODS.get(flags.get("method"))
    threshold = flags.get("freeze_threshold") if method is not None and method.masked else None
    written = []
    if os.path.isfile(disorder):
        written += [plot_disorder(disorder, os.path.join(run_dir, rundir.DISORDER_PNG),
                                  threshold),
                    plot_freeze_timeline(disorder, os.path.join(run_dir, rundir.FREEZE_PNG))]
    if os.path.isfile(gradients):
        written.append(plot_gradients(gradients, os.path.join(run_dir, rundir.GRADIENTS_PNG)))
    return written


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
    name = str(name)
    return name if len(name) <= width else "..." + name[-(width - 3):]


def save_figure(fig, png_path):
    """Renders `fig` to PNG in memory and writes it atomically; returns `png_path`."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    rundir.atomic_write(png_path, buffer.getvalue(), mode="wb")
    return png_path


PROG = "fqat_tf.plots"


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG,
                                description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="redraw a run's disorder, freeze and gradient plots "
                                          "from its CSVs")
    run.add_argument("run_dir", metavar="RUN_DIR")
    compare = commands.add_parser("compare", help="the applied scale gradient of two runs "
                                                  "of one seed (paper Fig. 4)")
    compare.add_argument("run_a", metavar="RUN_A", help="e.g. the FQAT run")
    compare.add_argument("run_b", metavar="RUN_B", help="e.g. its LSQ+SAGM twin")
    compare.add_argument("--out", required=True, help="the PNG")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        written = (plot_run(args.run_dir) if args.command == "run" else
                   [plot_compare(args.run_a, args.run_b, args.out)])
        for path in written:
            print(f"wrote {path}")

    return cli.run(PROG, body, args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
