"""The paper's two-phase search (§5.1; docs/algorithm.md §4): the learning rate, then r and K.

    python -m fqat_tf.sweep --flagfile='experiments/pacs_w4*.cfg' --sweep_dir=runs/pacs_w4 \\
        --seeds=0,23 --grid=paper --search=two_phase [--phase=1|2|both] [--dry_run]

Phase 1 runs each flagfile's own setting (its r and K) at every learning rate of
`defaults.LR_GRID`, over the sweep's test domains and seeds. Phase 2 selects, per flagfile,
the learning rate whose phase-1 runs have the best mean training-domain validation accuracy
over test domains and seeds (`report.best_setting`, the selection every table uses; test
accuracy never takes part) and runs the sweep's `--grid` (the paper's r x K for the freezing
methods, nothing for the others) at that rate. Phase 2 is planned only once every phase-1 run
of its flagfile has finished.

Both phases live in one sweep folder and name a run by its whole assignment
(`<cfg>__lr-<lr>__freeze_threshold-<r>__freeze_interval-<K>/<test>/seed<k>`), so the phase-1
run at the selected rate is phase 2's run at the flagfile's own (r, K), run once; a method
without a grid (LSQ, LSQ+SAGM) has as phase 2 that run alone. The setting folders of phase 2
are the search's result: `search.json` records each flagfile's phase-1 means, the selected
rate and those folders, and the sweep prints the report command over them.
"""
import os
import shlex
import sys

import numpy as np

from fqat_tf import cli
from fqat_tf import defaults
from fqat_tf import launch
from fqat_tf import report
from fqat_tf import rundir
from fqat_tf import sweep

PHASES = ("1", "2", "both")
SEARCH_JSON = "search.json"
PHASE_MANIFESTS = {"1": "sweep.phase1.json", "2": "sweep.phase2.json"}
_NAMED = 10  # unfinished phase-1 runs named in full when phase 2 is refused
# What the training program uses for a grid flag a flagfile leaves unset.
_TRAIN_DEFAULTS = {"freeze_threshold": defaults.FREEZE_THRESHOLD,
                   "freeze_interval": defaults.FREEZE_INTERVAL}


class PhasePending(sweep.SweepError):
    """Phase 2 asked for while phase 1 has unfinished runs (named)."""


def _lr_text(lr):
    return f"{float(lr):g}"


def _grid_value(own, values):
    """The flagfile's value, written as the grid writes the same number (so run folders of
    the two phases coincide), else as given."""
    for value in values:
        try:
            if float(value) == float(own):
                return value
        except ValueError:
            if value == own:
                return value
    return str(own)


def phase1_plan(flagfile, sweep_dir, test_domains="all", seeds=defaults.SEEDS, grid=None,
                extra_flags=(), command=sweep.TRAIN_COMMAND):
    """Phase 1 of a flagfile: its own values of the grid's flags at every learning rate.

    Arguments as `sweep.plan`; `grid` is phase 2's grid.

    Returns:
        The planned (output_dir, argv), as `sweep.plan`.
    """
    expanded, second = sweep.flagfile_grid(flagfile, grid, extra_flags)
    if "lr" in second:
        raise cli.UsageError("--search=two_phase selects --lr in phase 1; --grid may not name "
                             "lr")
    first = {"lr": [_lr_text(lr) for lr in defaults.LR_GRID]}
    for name, values in second.items():
        own = sweep.flag_value(expanded, name, _TRAIN_DEFAULTS.get(name))
        if own is None:
            raise sweep.SweepError(f"--search=two_phase: {flagfile} sets no --{name}; phase 1 "
                                   f"runs the flagfile's own value of every grid flag")
        first[name] = [_grid_value(own, values)]
    return sweep.plan(flagfile, sweep_dir, test_domains, seeds, first, extra_flags, command)


def select_lr(run_dirs):
    """The learning rate of the phase-1 runs with the best mean validation accuracy.

    Returns:
        (lr, {lr text: mean val_avg over the runs of that rate}).
    """
    runs = [report.load_run(d) for d in run_dirs]
    best = report.best_setting(runs)
    means = {}
    for r in runs:
        means.setdefault(_lr_text(r.hparams["lr"]), []).append(r.val_avg)
    return best[0].hparams["lr"], {lr: float(np.mean(v)) for lr, v in means.items()}


def phase2_plan(flagfile, sweep_dir, test_domains="all", seeds=defaults.SEEDS, grid=None,
                extra_flags=(), command=sweep.TRAIN_COMMAND):
    """Phase 2 of a flagfile: the grid at the learning rate phase 1 selected.

    Returns:
        (runs, selection): the planned (output_dir, argv), and {"flagfile", "mean_val",
        "selected_lr", "settings"} (the setting folders of phase 2).

    Raises:
        PhasePending: a phase-1 run of the flagfile has not finished, naming it.
    """
    first = phase1_plan(flagfile, sweep_dir, test_domains, seeds, grid, extra_flags, command)
    missing = [out for out, _ in first if not rundir.is_finished(out)]
    if missing:
        more = f" and {len(missing) - _NAMED} more" if len(missing) > _NAMED else ""
        raise PhasePending(f"{flagfile}: phase 1 is not finished: {len(missing)} of "
                           f"{len(first)} runs have no {rundir.RESULTS}: "
                           f"{', '.join(missing[:_NAMED])}{more}")
    lr, means = select_lr([out for out, _ in first])
    _, second = sweep.flagfile_grid(flagfile, grid, extra_flags)
    runs = sweep.plan(flagfile, sweep_dir, test_domains, seeds,
                      {"lr": [_lr_text(lr)], **second}, extra_flags, command)
    settings = list(dict.fromkeys(os.path.dirname(os.path.dirname(out)) for out, _ in runs))
    return runs, {"flagfile": flagfile, "mean_val": means, "selected_lr": lr,
                  "settings": settings}


def run_search(flagfiles, sweep_dir, phase, mode, plan_args, parallel=1, groups=None):
    """Lists, prints or runs the phases `phase` names, for every flagfile.

    Args:
        flagfiles: the sweep's flagfiles.
        sweep_dir: the sweep folder.
        phase: "1", "2" or "both" (phase 2 follows a phase 1 that ends with every run
            finished; listed or printed as pending while phase 1 is not finished).
        mode: `launch.MODES`.
        plan_args: `sweep.plan`'s test_domains, seeds, grid, extra_flags, command.
        parallel, groups: see `launch.run_sweep`.

    Returns:
        The exit code.
    """
    # With --launcher=commands stdout carries the commands alone.
    notes = sys.stderr if mode == "commands" else sys.stdout
    code = 0
    if phase in ("1", "both"):
        runs = [run for f in flagfiles for run in phase1_plan(f, sweep_dir, **plan_args)]
        code = launch.execute(runs, "phase 1", sweep_dir, mode, parallel, groups,
                              PHASE_MANIFESTS["1"])
        if code and mode == "run":
            print("phase 2 not started: phase 1 did not finish every run", file=sys.stderr)
            return code
    if phase == "1":
        return code
    try:
        planned = [phase2_plan(f, sweep_dir, **plan_args) for f in flagfiles]
    except PhasePending as e:
        if phase == "2" or mode == "run":
            raise
        print(f"phase 2: pending phase 1 ({e})", file=notes)
        return code
    for _, selection in planned:
        means = ", ".join(f"{lr}: {100 * v:.2f}" for lr, v in selection["mean_val"].items())
        print(f"phase 1 of {selection['flagfile']}: lr {_lr_text(selection['selected_lr'])} "
              f"selected (mean training-domain validation accuracy: {means})", file=notes)
    runs = [run for plan, _ in planned for run in plan]
    code = max(code, launch.execute(runs, "phase 2", sweep_dir, mode, parallel, groups,
                                    PHASE_MANIFESTS["2"]))
    settings = [s for _, selection in planned for s in selection["settings"]]
    if mode == "run":
        rundir.write_json(os.path.join(sweep_dir, SEARCH_JSON),
                          {"lr_grid": list(defaults.LR_GRID),
                           "flagfiles": [selection for _, selection in planned]})
    print("the search's runs: python -m fqat_tf.report "
          + " ".join(shlex.quote(s) for s in settings) + " --select_hparams", file=notes)
    return code
