"""Aggregates finished runs into the paper's tables (Tables 1-2 and 5-26; docs/algorithm.md §4).

    python -m fqat_tf.report runs/sweep --out table.md --csv table.csv [--select_hparams] \
        [--paired_with=lsq --paired_with=erm] [--split=val|test] [--heatmap=fig6.png]

One row per method setting (method, quantizer, bit widths, hyperparameters other than the seed
and the test domains), one (Val, Test) column pair per test domain plus the average, or with
`--split` one table of Val or of Test alone (the paper's Tables 5-26). `--heatmap` draws the
(K, r) grid of the freezing methods against LSQ+SAGM (paper Fig. 6, `fqat_tf.freeze_grid`). As in
DomainBed's leave-one-domain-out tables, the Val cell of a domain is the training-domain
validation accuracy of the runs that hold that domain out, the Test cell their accuracy on it;
a run holding out a group (DomainNet's pairs) fills the columns of every domain in the group.
Cells are "mean +- error" over seeds in percent.
"""
import collections
import csv
import dataclasses
import io
import json
import os
import sys

import numpy as np

from fqat_tf import cli
from fqat_tf import methods
from fqat_tf import rundir
from fqat_tf.data import registry
from fqat_tf.errors import UserError

ERRORS = {"std": "population standard deviation over seeds (numpy ddof=0)",
          "sem": "standard error over seeds (population std / sqrt(n), DomainBed's "
                 "collect_results)"}
AVG_STDS = {"seeds": "Avg: mean over seeds of each seed's average over the domain columns, "
                     "with the same error of those per-seed averages",
            "domains": "Avg: mean of the column means +- mean of the column errors (the "
                       "convention of the paper's Tables 11-26)"}
# The table parts; the paper prints each as a table of its own (Tables 5-26).
SPLITS = {"val": "Val = training-domain validation (in-distribution)",
          "test": "Test = held-out domain (out-of-distribution)"}
_NOT_HPARAMS = ("seed", "test_domains")
_REQUIRED = ("dataset", "method", "quantizer", "weight_bits", "activation_bits", "test_domains",
             "seed", "hparams", "test", "val_avg")


class ReportError(UserError):
    """Input the report cannot aggregate: no runs, mixed datasets, conflicting duplicates."""


@dataclasses.dataclass(frozen=True)
class Run:
    """The fields of one finished run's results.json that the tables use."""
    run_dir: str
    dataset: str
    setting: tuple         # (method, quantizer, weight_bits, activation_bits)
    hparams: dict
    hkey: str              # the hparams as canonical JSON, for grouping
    test_domains: tuple
    seed: int
    val_avg: float
    test: dict
    selection: str


def find_runs(roots):
    """Every finished run directory (one holding results.json) below each root, sorted.

    Raises:
        ReportError: a root is not a folder, or holds no finished run.
    """
    found = []
    for root in roots:
        if not os.path.isdir(root):
            raise ReportError(f"{root}: not a folder")
        here = sorted(os.path.dirname(os.path.join(folder, rundir.RESULTS))
                      for folder, _, files in os.walk(root) if rundir.RESULTS in files)
        if not here:
            raise ReportError(f"{root}: no finished run (no {rundir.RESULTS} below it)")
        found.extend(here)
    return found


def load_run(run_dir):
    """Reads one finished run; a clear error naming the file if a key is missing."""
    try:
        res = rundir.read_results(run_dir)
    except (FileNotFoundError, ValueError) as e:  # no such file, or not JSON: both named
        raise ReportError(str(e)) from None
    path = os.path.join(run_dir, rundir.RESULTS)
    missing = [k for k in _REQUIRED if k not in res]
    if missing:
        raise ReportError(f"{path}: missing key(s) {missing}")
    tests = res["test_domains"]
    tests = tuple(tests.split(",")) if isinstance(tests, str) else tuple(tests)
    absent = [d for d in tests if d not in res["test"]]
    if not tests or absent:
        raise ReportError(f"{path}: test_domains {list(tests)} but test accuracies for "
                          f"{sorted(res['test'])}")
    method = res["method"]
    quantized = methods.METHODS[method].quantized if method in methods.METHODS else (
        res["weight_bits"] is not None)
    # Quantizer and bit widths do not affect a float run, so they do not split its row.
    setting = (method, res["quantizer"], res["weight_bits"], res["activation_bits"]) \
        if quantized else (method, None, None, None)
    hparams = {k: v for k, v in dict(res["hparams"]).items() if k not in _NOT_HPARAMS}
    return Run(run_dir=run_dir, dataset=res["dataset"], setting=setting, hparams=hparams,
               hkey=json.dumps(hparams, sort_keys=True), test_domains=tests,
               seed=int(res["seed"]), val_avg=float(res["val_avg"]),
               test={d: float(res["test"][d]) for d in tests},
               selection=str(res.get("selection", "")))


def _dedupe(runs):
    """Drops a run found twice (e.g. a reused ERM stage); two different results are an error."""
    kept = {}
    for run in runs:
        key = (run.setting, run.hkey, run.test_domains, run.seed)
        other = kept.get(key)
        if other is None:
            kept[key] = run
        elif (other.val_avg, other.test) != (run.val_avg, run.test):
            raise ReportError(f"{other.run_dir} and {run.run_dir}: the same setting, test "
                              f"domains {list(run.test_domains)} and seed {run.seed} with "
                              f"different results; keep one of them out of the roots")
    return list(kept.values())


def _columns(dataset, runs):
    seen = {d for r in runs for d in r.test_domains}
    order = registry.DATASETS[dataset].domains if dataset in registry.DATASETS else ()
    return [d for d in order if d in seen] + sorted(seen - set(order))


def _stat(values, error):
    """(mean, error, n) in percent of accuracies in [0, 1]; None for no values."""
    if not values:
        return None
    v = 100.0 * np.asarray(values, dtype=np.float64)
    err = float(np.std(v))
    if error == "sem":
        err /= np.sqrt(len(v))
    return {"mean": float(np.mean(v)), "err": err, "n": len(v)}


def _row(setting, runs, columns, error, avg_std):
    """One table row from the runs of one setting (at most one run per test group and seed)."""
    per_col = {c: {} for c in columns}   # column -> seed -> (val, test)
    for r in runs:
        for d in r.test_domains:
            per_col[d][r.seed] = (r.val_avg, r.test[d])
    cells = {c: {"val": _stat([v for v, _ in per_col[c].values()], error),
                 "test": _stat([t for _, t in per_col[c].values()], error)} for c in columns}
    seeds = sorted({r.seed for r in runs})
    if avg_std == "seeds":
        complete = [s for s in seeds if all(s in per_col[c] for c in columns)]
        avg = {part: _stat([np.mean([per_col[c][s][i] for c in columns]) for s in complete],
                           error) for i, part in enumerate(("val", "test"))}
    elif all(cells[c]["val"] for c in columns):
        avg = {part: {"mean": float(np.mean([cells[c][part]["mean"] for c in columns])),
                      "err": float(np.mean([cells[c][part]["err"] for c in columns])),
                      "n": min(cells[c][part]["n"] for c in columns)}
               for part in ("val", "test")}
    else:
        avg = {"val": None, "test": None}
    method, quantizer, wbits, abits = setting
    return {"dataset": runs[0].dataset, "method": method, "quantizer": quantizer,
            "weight_bits": wbits, "activation_bits": abits, "columns": list(columns),
            "cells": cells, "avg": avg, "per_seed": per_col, "seeds": seeds, "runs": len(runs),
            "error": error, "avg_std": avg_std,
            "selection": sorted({r.selection for r in runs if r.selection})}


def _varying(hparam_dicts):
    """The hyperparameter names whose values differ between the given settings."""
    keys = sorted({k for h in hparam_dicts for k in h})
    return [k for k in keys if len({json.dumps(h.get(k)) for h in hparam_dicts}) > 1]


def _describe(hparams, keys):
    return ", ".join(f"{k}={hparams.get(k)}" for k in keys)


def best_setting(runs, key=lambda run: run.hkey):
    """The runs of the setting with the best mean training-domain validation accuracy.

    The model selection of every table, figure and search of the project: only val_avg
    decides, averaged over whatever runs a setting has (test groups and seeds); ties go to the
    first setting in canonical order, so the choice never depends on test accuracy.

    Args:
        runs: `Run`s, each belonging to one setting.
        key: the setting of a run (default: its hyperparameters as canonical JSON).

    Returns:
        The list of runs of the chosen setting.
    """
    settings = collections.defaultdict(list)
    for r in runs:
        settings[key(r)].append(r)
    if not settings:
        raise ReportError("no runs to select a setting from")
    best = max(sorted(settings), key=lambda s: np.mean([r.val_avg for r in settings[s]]))
    return settings[best]


def _select(family_runs):
    """Per test group, the runs of the hparam setting with the best mean validation accuracy."""
    by_group = collections.defaultdict(list)
    for r in family_runs:
        by_group[r.test_domains].append(r)
    chosen, selected = [], {}
    for group, runs in by_group.items():
        best = best_setting(runs)
        chosen.extend(best)
        selected["+".join(group)] = best[0].hparams
    return chosen, selected


def _sort_key(row):
    names = list(methods.METHODS)
    method = row["method"]
    return (row["quantizer"] is not None, str(row["quantizer"]), row["weight_bits"] or 0,
            row["activation_bits"] or 0, names.index(method) if method in names else len(names),
            method, row["label"])


def aggregate(run_dirs, select_hparams=False, error="std", avg_std="seeds"):
    """Groups finished runs into table rows.

    Args:
        run_dirs: finished run directories (see `find_runs`).
        select_hparams: per (method, quantizer, bits, test domains) keep only the hparam
            setting with the best mean training-domain validation accuracy over seeds.
        error: "std" (population std over seeds) or "sem" (DomainBed's standard error).
        avg_std: how the Avg column's error is formed; see `AVG_STDS`.

    Returns:
        A list of row dicts: "dataset", "method", "quantizer", "weight_bits",
        "activation_bits", "label", "hparams" (the setting's, or with `select_hparams` a dict
        test group -> selected hparams), "columns", "cells" (column -> {"val", "test"} ->
        {"mean", "err", "n"} in percent, or None), "avg", "per_seed" (column -> seed ->
        (val, test) in [0, 1]), "seeds", "runs", "error", "avg_std",
        "selection" (the runs' model-selection rules), "select_hparams", "varying" (the
        hparam names that differ within the row's method setting).

    Raises:
        ReportError: no runs, runs of more than one dataset, conflicting duplicate runs, or a
            bad `error` / `avg_std`.
    """
    if error not in ERRORS:
        raise ReportError(f"error={error!r}; expected one of {sorted(ERRORS)}")
    if avg_std not in AVG_STDS:
        raise ReportError(f"avg_std={avg_std!r}; expected one of {sorted(AVG_STDS)}")
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ReportError("no finished runs to aggregate")
    datasets = collections.defaultdict(list)
    for r in runs:
        datasets[r.dataset].append(r.run_dir)
    if len(datasets) > 1:
        examples = "; ".join(f"{d}: {dirs[0]}" for d, dirs in sorted(datasets.items()))
        raise ReportError(f"runs of {len(datasets)} datasets {sorted(datasets)} in one table "
                          f"({examples}); report each dataset separately")
    runs = _dedupe(runs)
    columns = _columns(runs[0].dataset, runs)
    families = collections.defaultdict(list)
    for r in runs:
        families[r.setting].append(r)
    rows = []
    for setting, family in families.items():
        label = setting[0] if setting[1] is None else f"{setting[0]} ({setting[1]})"
        if select_hparams:
            chosen, selected = _select(family)
            row = _row(setting, chosen, columns, error, avg_std)
            row.update(label=label, hparams=selected, select_hparams=True,
                       varying=_varying([r.hparams for r in family]))
            rows.append(row)
            continue
        varying = _varying([r.hparams for r in family])
        for hkey in sorted({r.hkey for r in family}):
            group = [r for r in family if r.hkey == hkey]
            row = _row(setting, group, columns, error, avg_std)
            suffix = _describe(group[0].hparams, varying)
            row.update(label=f"{label} [{suffix}]" if suffix else label,
                       hparams=group[0].hparams, select_hparams=False, varying=varying)
            rows.append(row)
    return sorted(rows, key=_sort_key)


def _bits(row):
    if row["weight_bits"] is None:
        return "Full"
    return f"{row['weight_bits']}/{row['activation_bits']}"


def _cell(stat, seeds):
    if stat is None:
        return "-"
    text = f"{stat['mean']:.2f} ± {stat['err']:.2f}"
    return text if stat["n"] == len(seeds) else f"{text} (n={stat['n']})"


def _check_rows(rows):
    if not rows:
        raise ReportError("no rows to format")
    if len({r["dataset"] for r in rows}) > 1 or len({tuple(r["columns"]) for r in rows}) > 1:
        raise ReportError("rows of different datasets or columns cannot share a table")


def to_markdown(rows, split=None):
    """The rows as a Markdown table with a footer that states every convention used.

    Args:
        rows: rows of `aggregate`.
        split: None for one table with a (Val, Test) pair per domain; "val" or "test" for the
            table of that part alone, one column per domain (the paper's Tables 5-26).
    """
    _check_rows(rows)
    if split is not None and split not in SPLITS:
        raise ReportError(f"--split={split}: expected one of {list(SPLITS)}")
    columns = rows[0]["columns"]
    parts = ("val", "test") if split is None else (split,)
    header = ["Method", "W/A"] + [f"{c} {p.title()}" if split is None else c
                                  for c in columns + ["Avg"] for p in parts] + ["Seeds"]
    title = ", ".join(SPLITS[p] for p in parts)
    lines = [f"### {rows[0]['dataset']}: accuracy (%), {title}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(row["cells"][c][p], row["seeds"]) for c in columns for p in parts]
        cells += [_cell(row["avg"][p], row["seeds"]) for p in parts]
        lines.append("| " + " | ".join([row["label"], _bits(row)] + cells +
                                       [", ".join(map(str, row["seeds"]))]) + " |")
    lines += ["", f"- Cells: mean ± {ERRORS[rows[0]['error']]}, in percent; (n=k) marks a "
              f"cell with fewer seeds than its row.", f"- {AVG_STDS[rows[0]['avg_std']]}."]
    rules = sorted({s for row in rows for s in row["selection"]})
    if rules:
        lines.append(f"- Model selection within each run: {'; '.join(rules)}.")
    if any(row["select_hparams"] for row in rows):
        lines.append("- Hyperparameters selected per (method, bits, test domains) by the best "
                     "mean training-domain validation accuracy over seeds (test accuracy never "
                     "used):")
        for row in (r for r in rows if r["select_hparams"]):
            for group, hparams in sorted(row["hparams"].items()):
                chosen = _describe(hparams, row["varying"]) or "the only setting"
                lines.append(f"  - {row['label']} {_bits(row)}, {group}: {chosen}")
    return "\n".join(lines) + "\n"


def paired_differences(rows, reference):
    """Per-seed Test differences of each row against a reference method's row, in points.

    Runs with the same seed and test domains share the ERM model, the hold-out split and the
    data order, so a difference taken seed by seed removes that shared variation; its spread
    is the one that decides whether one method beats another. A quantized row is paired with
    the reference row of the same quantizer and bit widths; when the reference is a
    full-precision method (ERM) every row is paired with it (the cost of quantization).

    Returns:
        A list of dicts: "label", "bits", "reference" (its label), "columns" -> {"mean",
        "err" (population std of the per-seed differences), "n", "wins" (seeds where the row is
        higher)} or None, and "avg" likewise for each seed's average over the columns.

    Raises:
        ReportError: no row of the reference method.
    """
    _check_rows(rows)
    refs = [r for r in rows if r["method"] == reference]
    if not refs:
        raise ReportError(f"--paired_with={reference}: no row of that method; methods in the "
                          f"table: {sorted({r['method'] for r in rows})}")
    columns = rows[0]["columns"]

    def diff(values):
        stat = _stat(values, "std")
        return stat and dict(stat, wins=int(np.sum(np.asarray(values) > 0)))

    def key(row):
        return row["quantizer"], row["weight_bits"], row["activation_bits"]

    out = []
    for row in rows:
        if row["method"] == reference:
            continue
        ref = next((r for r in refs if key(r) == key(row)), None)
        if ref is None and refs[0]["weight_bits"] is None:
            ref = refs[0]
        if ref is None:
            continue
        cells, per_seed = {}, collections.defaultdict(list)
        for c in columns:
            seeds = sorted(set(row["per_seed"][c]) & set(ref["per_seed"][c]))
            values = [row["per_seed"][c][s][1] - ref["per_seed"][c][s][1] for s in seeds]
            cells[c] = diff(values)
            for s, v in zip(seeds, values):
                per_seed[s].append(v)
        avg = diff([float(np.mean(v)) for v in per_seed.values() if len(v) == len(columns)])
        out.append({"label": row["label"], "bits": _bits(row), "reference": ref["label"],
                    "columns": cells, "avg": avg})
    return out


def paired_markdown(pairs, columns, reference):
    """The paired differences as a Markdown table with its reading conventions."""
    header = ["Method", "W/A", "vs"] + [f"{c} Test" for c in columns] + ["Avg Test"]
    lines = [f"### Paired Test differences against {reference} (points)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(d):
        return "-" if d is None else f"{d['mean']:+.2f} ± {d['err']:.2f} ({d['wins']}/{d['n']})"

    for p in pairs:
        lines.append("| " + " | ".join([p["label"], p["bits"], p["reference"]] +
                                       [cell(p["columns"][c]) for c in columns] +
                                       [cell(p["avg"])]) + " |")
    lines += ["", "- Cells: mean ± population std over seeds of (row - reference) for the same "
                  "seed and test domains, which share the ERM model and data order; (k/n): "
                  "seeds where the row is higher."]
    return "\n".join(lines) + "\n"


def to_csv(rows):
    """The rows as CSV: one numeric mean / error / n triple per column, part and average."""
    _check_rows(rows)
    columns = rows[0]["columns"] + ["avg"]
    err = rows[0]["error"]
    header = ["dataset", "method", "quantizer", "weight_bits", "activation_bits", "label",
              "hparams", "seeds"] + [f"{c}_{p}_{s}" for c in columns for p in ("val", "test")
                                     for s in ("mean", err, "n")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = []
        for c in columns:
            for p in ("val", "test"):
                stat = row["avg"][p] if c == "avg" else row["cells"][c][p]
                values += ["", "", ""] if stat is None else [
                    f"{stat['mean']:.4f}", f"{stat['err']:.4f}", stat["n"]]
        writer.writerow([row["dataset"], row["method"], row["quantizer"] or "",
                         row["weight_bits"] or "", row["activation_bits"] or "", row["label"],
                         json.dumps(row["hparams"], sort_keys=True),
                         " ".join(map(str, row["seeds"]))] + values)
    return out.getvalue()


PROG = "fqat_tf.report"


def _report(args):
    run_dirs = find_runs(args.roots)
    rows = aggregate(run_dirs, args.select_hparams, args.error, args.avg_std)
    markdown = to_markdown(rows, args.split)
    for reference in args.paired_with:
        markdown += "\n" + paired_markdown(paired_differences(rows, reference),
                                           rows[0]["columns"], reference)
    grids = None
    if args.heatmap:
        from fqat_tf import freeze_grid  # matplotlib loads only when a figure is asked for

        grids = freeze_grid.freeze_grids(_dedupe([load_run(d) for d in run_dirs]))
    # Every input is checked before the first file is written.
    if args.out:
        rundir.atomic_write(args.out, markdown)
    if args.csv:
        rundir.atomic_write(args.csv, to_csv(rows))
    if grids is not None:
        freeze_grid.plot_freeze_grids(grids, args.heatmap)
    print(markdown, end="")


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", metavar="RUN_ROOT",
                        help="folders searched for finished runs (results.json)")
    parser.add_argument("--out", help="write the Markdown table here (it is printed anyway)")
    parser.add_argument("--csv", help="write the table as CSV here")
    parser.add_argument("--select_hparams", action="store_true",
                        help="keep per (method, bits, test domains) the hparam setting with "
                             "the best mean training-domain validation accuracy")
    parser.add_argument("--error", choices=sorted(ERRORS), default="std")
    parser.add_argument("--avg_std", choices=sorted(AVG_STDS), default="seeds")
    parser.add_argument("--split", choices=sorted(SPLITS),
                        help="one table of that part alone, a column per domain (the paper's "
                             "Tables 5-26); default: a (Val, Test) pair per domain")
    parser.add_argument("--paired_with", action="append", default=[], metavar="METHOD",
                        help="add a table of per-seed Test differences against this method "
                             "(e.g. lsq, erm); repeatable")
    parser.add_argument("--heatmap", metavar="PNG",
                        help="also draw the (K, r) grid of the freezing methods against the "
                             "LSQ+SAGM baseline here (paper Fig. 6)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return cli.run(PROG, lambda: _report(args), args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
