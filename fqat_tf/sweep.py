"""Leave-one-domain-out sweeps: test domains x seeds x a grid (docs/algorithm.md §4).

    python -m fqat_tf.sweep --flagfile=experiments/pacs_w4.cfg --sweep_dir=runs/pacs_w4 \\
        --seeds=0,23 --grid="freeze_threshold=0.28,0.30,0.32;freeze_interval=300,350,400" \\
        [--test_domains=all|a,b|a+b,c+d] [--dry_run] [--parallel=1] [-- --smoke]
    python -m fqat_tf.sweep --flagfile='experiments/rotated_mnist_*.cfg' --grid=paper ...
    python -m fqat_tf.sweep ... --grid=paper --search=two_phase [--phase=1|2|both]
    python -m fqat_tf.sweep ... --devices=all [--gpus_per_run=2]    # one run per GPU (group)
    python -m fqat_tf.sweep ... --launcher=commands > runs.txt      # for Slurm / GNU parallel

Each run is a subprocess `python -m fqat_tf.train --flagfile=... [extra flags] --test_domains=...
--seed=... --<grid flags> --output_dir=SWEEP_DIR/<cfg>[__<grid point>]/<test>/seed<k>`, and
every run shares the ERM cache SWEEP_DIR/erm_cache, so all methods of a sweep start from the
same ERM stages. Before anything starts, the training program is asked about every run
directory that exists (`fqat_tf.launch`): finished runs with the same settings are skipped, an
interrupted one is started again and resumes by itself, and one holding a run with other
settings is a conflict (reported, not run, exit status 1). `--grid=paper` takes the paper's r
and K grid for the flagfile's dataset and weight bits, for the methods that freeze (other
methods run once per test group and seed); `--search=two_phase` first selects the learning
rate (`fqat_tf.search`). `--flagfile` may be repeated or be a glob: one sweep then runs every
flagfile's plan, in the order given. Flags after `--` go to every run.
"""
import argparse
import glob
import itertools
import os
import shlex
import sys

from absl import flags as absl_flags

from fqat_tf import cli
from fqat_tf import defaults
from fqat_tf import devices
from fqat_tf import launch
from fqat_tf import methods
from fqat_tf.data import registry
from fqat_tf.errors import UserError

TRAIN_COMMAND = (sys.executable, "-m", "fqat_tf.train")
# Set by the sweep for every run; a grid or extra flag may not set them.
CONTROLLED_FLAGS = ("flagfile", "test_domains", "seed", "output_dir")


class SweepError(UserError):
    """A sweep that cannot be planned or run as asked, naming the flagfile, flag or run."""


def expand_flags(flagfile, extra_flags=()):
    """The flags a run sees, with every (nested) flagfile expanded as absl expands it.

    Raises:
        FileNotFoundError: the flagfile, or one it includes, does not exist.
    """
    if not os.path.isfile(flagfile):
        raise FileNotFoundError(f"--flagfile={flagfile}: no such file")
    try:
        argv = absl_flags.FlagValues().read_flags_from_files(
            ["sweep", f"--flagfile={flagfile}", *extra_flags], force_gnu=True)
    except absl_flags.Error as e:
        raise FileNotFoundError(f"--flagfile={flagfile}: {e}") from None
    return argv[1:]


def expand_flagfiles(patterns):
    """The flagfiles named by `patterns` (paths or glob patterns), each once, in given order.

    Raises:
        FileNotFoundError: a pattern that matches no file.
        SweepError: two flagfiles with the same stem (their runs would share folders).
    """
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"--flagfile={pattern}: no such file")
        files.extend(m for m in matches if m not in files)
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise SweepError(f"--flagfile: several flagfiles named {repeated}; their runs would "
                         f"share folders")
    return files


def flag_value(args, name, default=None):
    """The last `--name=value` in `args` (absl's last-wins rule), else `default`."""
    value = default
    for arg in args:
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _flag_names(arg):
    """The flag names `--name=value` or a bare `--name` / `--noname` boolean may set."""
    body = arg.lstrip("-").split("=", 1)[0]
    return {body, body[2:]} if body.startswith("no") and "=" not in arg else {body}


def check_extra_flags(extra_flags):
    """Extra flags must be `--name=value` (or a bare boolean) and not set a sweep flag."""
    for arg in extra_flags:
        if not arg.startswith("--") or len(arg) < 3:
            raise cli.UsageError(f"extra flag {arg!r}: pass flags after '--' as --name=value")
        if _flag_names(arg) & set(CONTROLLED_FLAGS):
            raise cli.UsageError(f"extra flag {arg!r}: {CONTROLLED_FLAGS} are set by the sweep; "
                                 f"use its own options (--flagfile, --test_domains, --seeds)")
    return list(extra_flags)


def parse_grid(text):
    """Parses "name=v1,v2;name2=v3" into {name: [v1, v2], name2: [v3]} (values as text).

    Raises:
        UsageError: a part without "=", an empty name or value, a repeated name, or a flag the
            sweep sets itself.
    """
    grid = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip().lstrip("-")
        items = [v.strip() for v in values.split(",")]
        if not sep or not name.isidentifier():
            raise cli.UsageError(f"--grid part {part!r}: expected name=value1,value2,...")
        if not all(items):
            raise cli.UsageError(f"--grid part {part!r}: empty value")
        if name in grid:
            raise cli.UsageError(f"--grid names {name!r} twice")
        if name in CONTROLLED_FLAGS:
            raise cli.UsageError(f"--grid may not set {name!r}; the sweep sets "
                                 f"{CONTROLLED_FLAGS}")
        grid[name] = items
    return grid


def paper_grid(dataset, weight_bits):
    """The paper's freeze grid (r, K) for a dataset and weight bit width (docs/algorithm.md §3).

    RotatedMNIST, which the paper does not quantize, gets the grid of the offline results table
    (`defaults.FREEZE_GRID["rotated_mnist_miniature"]`) at every bit width.
    """
    bits = int(weight_bits)
    if dataset in ("rotated_mnist", "rotated_mnist_5k"):
        key = "rotated_mnist_miniature"
    elif dataset == "domain_net":
        key = {4: "domainnet_4_5bit", 5: "domainnet_4_5bit", 8: "domainnet_8bit"}.get(bits)
    else:
        key = {3: "pacs_officehome_3bit", 4: "pacs_officehome_4_5bit",
               5: "pacs_officehome_4_5bit"}.get(bits)
    if key is None:
        raise SweepError(f"--grid=paper: the paper has no freeze grid for {dataset} at "
                         f"{bits} weight bits")
    cell = defaults.FREEZE_GRID[key]
    return {"freeze_threshold": [f"{r:g}" for r in cell["r"]],
            "freeze_interval": [str(k) for k in cell["K"]]}


def test_groups(dataset, spec="all"):
    """The held-out domain groups: "all" (the dataset's leave-out groups), "a,b" or "a+b,c+d".

    Raises:
        DataError: an unknown dataset or domain, or a domain given twice.
    """
    info = registry.get_info(dataset)
    if spec == "all":
        if not info.test_groups:
            raise registry.DataError(f"{dataset} lists no domains; give --test_domains")
        return [tuple(g) for g in info.test_groups]
    groups = [tuple(d.strip() for d in part.split("+")) for part in spec.split(",") if part]
    if info.domains:
        # Dataset order inside a group, so "b+a" and "a+b" name the same run folder.
        groups = [tuple(sorted(registry.resolve_domains(g, info.domains),
                               key=info.domains.index)) for g in groups]
    flat = [d for g in groups for d in g]
    if not groups or len(flat) != len(set(flat)) or not all(flat):
        raise registry.DataError(f"--test_domains={spec!r}: empty or repeated domain")
    return groups


def _safe(text):
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in str(text))


ERM_CACHE = "erm_cache"


def setting_name(assignment):
    """Folder name of one grid point: "default", or "name-value__name-value"."""
    return "__".join(f"{k}-{_safe(v)}" for k, v in assignment) or "default"


def flagfile_grid(flagfile, grid, extra_flags=()):
    """The flags a flagfile's runs see and the grid it gets (see `plan`'s `grid`).

    Returns:
        (expanded flags, grid dict name -> list of value texts).
    """
    expanded = expand_flags(flagfile, extra_flags)
    dataset = flag_value(expanded, "dataset")
    if dataset is None:
        raise SweepError(f"--flagfile={flagfile} sets no --dataset")
    if grid == "paper":
        method = flag_value(expanded, "method", defaults.METHOD)
        try:
            masked = methods.resolve(method).masked
        except ValueError as e:
            raise SweepError(f"--flagfile={flagfile}: {e}") from None
        grid = paper_grid(dataset, flag_value(expanded, "weight_bits", defaults.WEIGHT_BITS)) \
            if masked else {}
    if grid is None or isinstance(grid, str):
        return expanded, parse_grid(grid)
    return expanded, parse_grid(";".join(f"{k}={','.join(map(str, v))}"
                                         for k, v in grid.items()))


def plan(flagfile, sweep_dir, test_domains="all", seeds=defaults.SEEDS, grid=None,
         extra_flags=(), command=TRAIN_COMMAND):
    """Every run of a sweep, finished or not, in launch order (grid point, test group, seed).

    Args:
        flagfile: the experiment's flagfile; its `--dataset` names the domains.
        sweep_dir: the folder that receives one run directory per run.
        test_domains: "all", "a,b" (one run per domain) or "a+b,c+d" (held out together).
        seeds: the training seeds.
        grid: None, a dict name -> values, "paper", or text for `parse_grid`. "paper" grids
            only a method that reads the freeze masks (FQAT and its freezing ablations); any
            other method gets a single run per test group and seed.
        extra_flags: flags for every run, after the flagfile (so they override it).
        command: the training program's argv prefix.

    Returns:
        A list of (output_dir, argv).

    Raises:
        SweepError / UsageError / DataError / FileNotFoundError: bad arguments, each naming
            the culprit.
    """
    extra = check_extra_flags(extra_flags)
    expanded, grid = flagfile_grid(flagfile, grid, extra)
    dataset = flag_value(expanded, "dataset")
    clash = sorted(k for k in grid if any(k in _flag_names(a) for a in extra))
    if clash:
        raise cli.UsageError(f"{clash} set both by --grid and by an extra flag")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise cli.UsageError(f"--seeds={seeds}: give at least one seed, each once")
    groups = test_groups(dataset, test_domains)
    stem = os.path.splitext(os.path.basename(flagfile))[0]
    if not any("erm_cache_dir" in _flag_names(a) for a in extra):
        # One ERM cache per sweep: every method of a sweep starts from the same ERM stages.
        extra = [*extra, f"--erm_cache_dir={os.path.join(sweep_dir, ERM_CACHE)}"]
    runs = []
    for values in itertools.product(*grid.values()):
        assignment = list(zip(grid, values))
        for group in groups:
            for seed in seeds:
                out = os.path.join(sweep_dir, stem + ("__" + setting_name(assignment)
                                                      if assignment else ""),
                                   "+".join(_safe(d) for d in group), f"seed{seed}")
                argv = [*command, f"--flagfile={flagfile}", *extra,
                        f"--test_domains={','.join(group)}", f"--seed={seed}",
                        *(f"--{k}={v}" for k, v in assignment), f"--output_dir={out}"]
                runs.append((out, argv))
    return runs


def _options(args):
    """Checks the options that do not depend on the flagfiles (usage errors, exit 2)."""
    if args.parallel < 1:
        raise cli.UsageError(f"--parallel={args.parallel}: expected at least 1")
    if args.gpus_per_run < 1:
        raise cli.UsageError(f"--gpus_per_run={args.gpus_per_run}: expected at least 1")
    if args.devices and args.parallel != 1:
        raise cli.UsageError("--parallel with --devices: the runs at a time are the device "
                             "groups (--devices / --gpus_per_run)")
    if args.devices and args.launcher == "commands":
        raise cli.UsageError("--devices with --launcher=commands: the scheduler that runs the "
                             "commands assigns the GPUs")
    if args.gpus_per_run > 1 and not args.devices and args.launcher != "commands":
        raise cli.UsageError(f"--gpus_per_run={args.gpus_per_run} needs --devices (or "
                             f"--launcher=commands)")
    if args.phase and not args.search:
        raise cli.UsageError("--phase needs --search=two_phase")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise cli.UsageError(f"--seeds={args.seeds}: expected integers, e.g. 0,23") from None
    return seeds


def _sweep(args, extra):
    seeds = _options(args)
    command = shlex.split(args.train_command) if args.train_command else TRAIN_COMMAND
    if args.gpus_per_run > 1:
        if any("strategy" in _flag_names(a) for a in extra):
            raise cli.UsageError("--gpus_per_run > 1 sets --strategy=mirrored; drop the extra "
                                 "--strategy flag")
        extra = [*extra, "--strategy=mirrored"]
    # GPUs are checked before anything is planned, run or written.
    groups = devices.device_groups(args.devices, args.gpus_per_run) if args.devices else None
    flagfiles = expand_flagfiles(args.flagfile)
    if args.search is None:
        runs = [run for flagfile in flagfiles for run in plan(
            flagfile, args.sweep_dir, args.test_domains, seeds, args.grid or None, extra,
            command)]
        return launch.execute(runs, f"sweep {args.sweep_dir}", args.sweep_dir, _mode(args),
                              args.parallel, groups)
    from fqat_tf import search  # built on this module's planning

    return search.run_search(flagfiles, args.sweep_dir, args.phase or "both", _mode(args),
                             dict(test_domains=args.test_domains, seeds=seeds,
                                  grid=args.grid or None, extra_flags=extra, command=command),
                             args.parallel, groups)


def _mode(args):
    return "dry_run" if args.dry_run else "commands" if args.launcher == "commands" else "run"


PROG = "fqat_tf.sweep"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = cli.ArgumentParser(prog=PROG,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagfile", required=True, action="append",
                        help="an experiment's flagfile or a glob of them (quote it); repeatable")
    parser.add_argument("--sweep_dir", required=True, help="folder of the run directories")
    parser.add_argument("--test_domains", default="all", help="all | a,b | a+b,c+d")
    parser.add_argument("--seeds", default=",".join(map(str, defaults.SEEDS)))
    parser.add_argument("--grid", default="", help='"name=v1,v2;name2=v3" or "paper"')
    parser.add_argument("--search", choices=("two_phase",),
                        help="the paper's search: phase 1 selects the learning rate "
                             "(defaults.LR_GRID), phase 2 runs --grid at it")
    parser.add_argument("--phase", choices=("1", "2", "both"),
                        help="with --search: which phase to list, print or run (default both)")
    parser.add_argument("--dry_run", action="store_true", help="list the runs, start none")
    parser.add_argument("--launcher", choices=("local", "commands"), default="local",
                        help="local: run here; commands: print one shell command per run "
                             "that is not finished, start nothing")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time on the default devices (CPU)")
    parser.add_argument("--devices", help="GPUs to run on, 'all' or indices (0,1,2,3): one "
                                          "run per GPU group at a time")
    parser.add_argument("--gpus_per_run", type=int, default=1,
                        help="GPUs per run (>1 adds --strategy=mirrored)")
    # Internal: the training program's argv prefix, so tests can substitute a stand-in.
    parser.add_argument("--train_command", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    return cli.run(PROG, lambda: _sweep(args, extra), args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
