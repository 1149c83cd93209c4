"""How a trained model's OOD accuracy moves when one layer's scale factors move (paper Table 3;
docs/algorithm.md §6).

    python -m fqat_tf.scale_sensitivity RUN_DIR [--factors=0.8,0.9,1.1,1.2] [--out PREFIX] \\
        [--layers=REGEX] [--per=layer|variable]

For every quantized layer of the run's selected model (`model.keras`), in model order, the
layer's scale factors (its kernel step and its input step, those it has) are multiplied by
each factor x, the test domains are evaluated, and every step is restored bit-exactly before
the next row (`--per=variable`: each step alone, as the paper's Table 3 lists them). The
evaluation data is the run's own, rebuilt as the training program builds it
(`fqat_tf.data.load_splits` + `eval_streams` + `evaluate` with the run's dataset, data folder,
test domains, hold-out fraction, seed, file checks, image size and evaluation batch size), so
the unchanged model reproduces the run's results.json test accuracy exactly; the tables say
when it does not. The paper reads a factor that raises OOD accuracy as a sign that the scales
have not converged to a flat optimum, and the spread across layers as their different
sensitivity.

Writes PREFIX.md (one row per layer, one column per factor plus the unchanged accuracy; each
cell the test accuracy of every test domain, with an arrow against the unchanged model) and
PREFIX.csv (one line per layer and factor), both atomically; PREFIX defaults to
RUN_DIR/scale_sensitivity.
"""
import argparse
import csv
import io
import math
import os
import re
import sys

import keras

from fqat_tf import cli
from fqat_tf import data
from fqat_tf import defaults
from fqat_tf import methods
from fqat_tf import rundir
from fqat_tf.errors import UserError
from fqat_tf.quantize import quantize_wrappers

PROG = "fqat_tf.scale_sensitivity"
OUT_NAME = "scale_sensitivity"
PER = ("layer", "variable")
_ARROWS = {1: "↑", -1: "↓", 0: "−"}


class SensitivityError(UserError):
    """A run, factor or layer pattern the analysis cannot use, named."""


def parse_factors(text):
    """Parses "0.9,1.1" into (0.9, 1.1); each factor a finite number > 0, each once."""
    factors = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise SensitivityError(f"--factors: {part.strip()!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise SensitivityError(f"--factors: {part.strip()!r} must be a number > 0")
        if value in factors:
            raise SensitivityError(f"--factors: {part.strip()!r} given twice")
        factors.append(value)
    return tuple(factors)


def quantized_layers(model, pattern=None, per="layer"):
    """(name, scale variables) of every quantized layer, in model order.

    Args:
        model: a quantized model (`fqat_tf.quantize_model`).
        pattern: a regular expression; only layers whose name it matches (re.search).
        per: "layer" (a layer's kernel and input steps move together) or "variable" (each
            step alone, named by its path, as the paper's Table 3 lists them).

    Raises:
        SensitivityError: no quantized layer (a full-precision model), or none matching.
    """
    if per not in PER:
        raise SensitivityError(f"--per={per}: expected one of {list(PER)}")
    layers = [(w.name, list(w.scale_variables)) for w in quantize_wrappers(model)
              if w.scale_variables]
    if not layers:
        raise SensitivityError(f"model {model.name!r} has no quantized layer, so no scale "
                               f"factor to perturb")
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise SensitivityError(f"--layers={pattern!r}: not a regular expression ({e})") \
                from None
        layers = [item for item in layers if regex.search(item[0])]
        if not layers:
            raise SensitivityError(f"--layers={pattern!r} matches no quantized layer of "
                                   f"{model.name!r}")
    if per == "variable":
        return [(v.path, [v]) for _, variables in layers for v in variables]
    return layers


def sensitivity(model, streams, factors, layers):
    """OOD accuracy with each layer's scale factors multiplied by each factor.

    Args:
        model: the quantized model; its steps are changed during the call and restored.
        streams: `{"test": {domain: dataset}}` (`fqat_tf.data.eval_streams`).
        factors: the multipliers.
        layers: `quantized_layers(model)` or a subset.

    Returns:
        {"unchanged": accuracies, "rows": [{"layer", "variables", "accuracy": {factor:
        accuracies}}]}, accuracies being `evaluate`'s dict of "test/<domain>" and "test_avg".
    """
    def accuracy():
        return data.evaluate(model, {"test": streams["test"]}, verbose=0)

    table = {"unchanged": accuracy(), "rows": []}
    for name, variables in layers:
        originals = [keras.ops.convert_to_numpy(v) for v in variables]
        row = {"layer": name, "variables": [v.path for v in variables], "accuracy": {}}
        try:
            for factor in factors:
                for v, value in zip(variables, originals):
                    v.assign(value * value.dtype.type(factor))
                row["accuracy"][factor] = accuracy()
        finally:
            for v, value in zip(variables, originals):
                v.assign(value)
        table["rows"].append(row)
    return table


def open_run(run_dir):
    """The flags and results of a finished quantized run; refuses anything else, named."""
    if not os.path.isdir(run_dir):
        raise SensitivityError(f"{run_dir}: no such run directory")
    if not rundir.is_finished(run_dir):
        raise SensitivityError(f"{run_dir}: not a finished run (no {rundir.RESULTS}); its "
                               f"selected model is chosen when it finishes")
    try:
        flags = rundir.read_json(os.path.join(run_dir, rundir.FLAGS_JSON))
        results = rundir.read_results(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SensitivityError(str(e)) from None
    method = methods.METHODS.get(flags.get("method"))
    if method is not None and not method.quantized:
        raise SensitivityError(f"{run_dir}: a full-precision run (method {flags['method']}) "
                               f"has no scale factors")
    if not os.path.isfile(os.path.join(run_dir, rundir.MODEL)):
        raise SensitivityError(f"{os.path.join(run_dir, rundir.MODEL)}: no such file")
    return flags, results


def evaluation_streams(flags):
    """The run's evaluation streams, built from its flags by the trainer's own code."""
    from fqat_tf import trainer

    return trainer.Inputs(flags).eval_streams


def _percent(factor):
    return f"{100 * factor:g}%"


def _cell(acc, reference, domains):
    parts = []
    for d in domains:
        value, base = acc[f"test/{d}"], reference[f"test/{d}"]
        sign = (value > base) - (value < base)
        parts.append(f"{100 * value:.2f}" + ("" if reference is acc else f" {_ARROWS[sign]}"))
    return " / ".join(parts)


def to_markdown(table, run_dir, results):
    """The table as Markdown, with how to read it and whether the run's accuracy reproduced."""
    domains = [k[5:] for k in table["unchanged"] if k.startswith("test/")]
    factors = list(table["rows"][0]["accuracy"]) if table["rows"] else []
    header = ["Layer", "unchanged"] + [_percent(x) for x in factors]
    lines = [f"### Scale-factor sensitivity of {run_dir}: test accuracy (%) of "
             f"{' / '.join(domains)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    unchanged = table["unchanged"]
    for row in table["rows"]:
        cells = [_cell(unchanged, unchanged, domains)] + [
            _cell(row["accuracy"][x], unchanged, domains) for x in factors]
        lines.append("| " + " | ".join([row["layer"]] + cells) + " |")
    reproduced = all(unchanged[f"test/{d}"] == results["test"].get(d) for d in domains)
    lines += ["", "- x%: the row's scale factors (a layer's kernel and input steps, or one "
                  "step) multiplied by x; ↑ higher, ↓ lower, − equal to the unchanged model.",
              f"- Unchanged model: {'reproduces' if reproduced else 'DIFFERS FROM'} the run's "
              f"{rundir.RESULTS} test accuracy ("
              + ", ".join(f"{d}: {100 * results['test'].get(d, float('nan')):.2f}"
                          for d in domains) + ")."]
    return "\n".join(lines) + "\n", reproduced


def to_csv(table):
    """One line per layer and factor (factor 1 = the unchanged model, layer empty)."""
    domains = [k[5:] for k in table["unchanged"] if k.startswith("test/")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "variables", "factor", "test_avg"] + [f"test/{d}" for d in domains])

    def line(layer, variables, factor, acc):
        writer.writerow([layer, " ".join(variables), f"{factor:g}", repr(acc["test_avg"])]
                        + [repr(acc[f"test/{d}"]) for d in domains])

    line("", [], 1.0, table["unchanged"])
    for row in table["rows"]:
        for factor, acc in row["accuracy"].items():
            line(row["layer"], row["variables"], factor, acc)
    return out.getvalue()


def run(run_dir, factors=defaults.SCALE_FACTORS, out=None, layers=None, per="layer"):
    """Runs the analysis on a finished run; returns (markdown, md path, csv path, reproduced).

    Args:
        run_dir: a finished quantized run.
        factors: the multipliers of the scale factors.
        out: the output prefix (default RUN_DIR/scale_sensitivity).
        layers, per: which rows; see `quantized_layers`.
    """
    flags, results = open_run(run_dir)
    streams = evaluation_streams(flags)
    model = keras.saving.load_model(os.path.join(run_dir, rundir.MODEL), safe_mode=True)
    table = sensitivity(model, streams, factors, quantized_layers(model, layers, per))
    markdown, reproduced = to_markdown(table, run_dir, results)
    prefix = out or os.path.join(run_dir, OUT_NAME)
    rundir.atomic_write(prefix + ".md", markdown)
    rundir.atomic_write(prefix + ".csv", to_csv(table))
    return markdown, prefix + ".md", prefix + ".csv", reproduced


def _factors_arg(text):
    try:
        return parse_factors(text)
    except SensitivityError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished quantized run")
    parser.add_argument("--factors", type=_factors_arg,
                        default=defaults.SCALE_FACTORS,
                        help="multipliers of the scale factors, e.g. 0.9,0.95,1.05,1.1 "
                             "(default: the paper's 0.8,0.9,1.1,1.2)")
    parser.add_argument("--out", metavar="PREFIX",
                        help=f"writes PREFIX.md and PREFIX.csv (default RUN_DIR/{OUT_NAME})")
    parser.add_argument("--layers", metavar="REGEX",
                        help="only the quantized layers whose name matches (default: all)")
    parser.add_argument("--per", choices=PER, default="layer",
                        help="a row per layer (its kernel and input steps together, default) "
                             "or per scale variable (the paper's Table 3 rows)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cli.configure_logging(args.verbosity)

    def body():
        markdown, md, csv_path, reproduced = run(args.run_dir, args.factors, args.out,
                                                 args.layers, args.per)
        print(markdown, end="")
        print(f"wrote {md} and {csv_path}")
        if not reproduced:
            print(f"{PROG}: warning: the unchanged model does not reproduce "
                  f"{os.path.join(args.run_dir, rundir.RESULTS)}'s test accuracy",
                  file=sys.stderr)

    return cli.run(PROG, body, args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
