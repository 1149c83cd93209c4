"""Leave-one-domain-out sweeps: test domains x seeds x a hyperparameter grid, one run each.

    python -m fqat_tf.sweep --flagfile=experiments/pacs_w4.cfg --sweep_dir=runs/pacs_w4 \\
        --seeds=0,23 --grid="freeze_threshold=0.28,0.30,0.32;freeze_interval=300,350,400" \\
        [--test_domains=all|a,b|a+b,c+d] [--dry_run] [--parallel=1] [-- --smoke]
    python -m fqat_tf.sweep --flagfile='experiments/rotated_mnist_*.cfg' --grid=paper ...

Each run is a subprocess `python -m fqat_tf.train --flagfile=... [extra flags] --test_domains=...
--seed=... --<grid flags> --output_dir=SWEEP_DIR/<cfg>[__<grid point>]/<test>/seed<k>`, and every run shares the
ERM cache SWEEP_DIR/erm_cache, so all methods of a sweep start from the same ERM stages. Finished runs
(results.json present) are skipped; an interrupted run is simply started again with the same
output_dir, from which the training program resumes by itself. `--grid=paper` takes the paper's
r and K grid for the flagfile's dataset and weight bits, for the methods that freeze (other
methods run once per test group and seed). `--flagfile` may be repeated or be a glob: one sweep
then runs every flagfile's plan, in the order given. Flags after `--` go to every run.
"""
import argparse
import glob
import itertools
import os
import shlex
import subprocess
import sys
import time

from absl import flags as absl_flags

from fqat_tf import defaults
from fqat_tf import methods
from fqat_tf import rundir
from fqat_tf.data import registry

TRAIN_COMMAND = (sys.executable, "-m", "fqat_tf.train")
SWEEP_JSON = "sweep.json"
LOGS = "logs"
# Set by the sweep for every run; a grid or extra flag may not set them.
CONTROLLED_FLAGS = ("flagfile", "test_domains", "seed", "output_dir")


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
        ValueError: two flagfiles with the same stem (their runs would share folders).
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
        raise ValueError(f"--flagfile: several flagfiles named {repeated}; their runs would "
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
            raise ValueError(f"extra flag {arg!r}: pass flags after '--' as --name=value")
        if _flag_names(arg) & set(CONTROLLED_FLAGS):
            raise ValueError(f"extra flag {arg!r}: {CONTROLLED_FLAGS} are set by the sweep; use "
                             f"its own options (--flagfile, --test_domains, --seeds)")
    return list(extra_flags)


def parse_grid(text):
    """Parses "name=v1,v2;name2=v3" into {name: [v1, v2], name2: [v3]} (values as text).

    Raises:
        ValueError: a part without "=", an empty name or value, a repeated name, or a flag the
            sweep sets itself.
    """
    grid = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip().lstrip("-")
        items = [v.strip() for v in values.split(",")]
        if not sep or not name.isidentifier():
            raise ValueError(f"--grid part {part!r}: expected name=value1,value2,...")
        if not all(items):
            raise ValueError(f"--grid part {part!r}: empty value")
        if name in grid:
            raise ValueError(f"--grid names {name!r} twice")
        if name in CONTROLLED_FLAGS:
            raise ValueError(f"--grid may not set {name!r}; the sweep sets {CONTROLLED_FLAGS}")
        grid[name] = items
    return grid


def paper_grid(dataset, weight_bits):
    """The paper's freeze grid (r, K) for a dataset and weight bit width (ALGORITHM.md §3).

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
        raise ValueError(f"--grid=paper: the paper has no freeze grid for {dataset} at "
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
        ValueError / DataError / FileNotFoundError: bad arguments, each naming the culprit.
    """
    extra = check_extra_flags(extra_flags)
    expanded = expand_flags(flagfile, extra)
    dataset = flag_value(expanded, "dataset")
    if dataset is None:
        raise ValueError(f"--flagfile={flagfile} sets no --dataset")
    if grid == "paper":
        method = flag_value(expanded, "method", defaults.METHOD)
        try:
            masked = methods.resolve(method).masked
        except ValueError as e:
            raise ValueError(f"--flagfile={flagfile}: {e}") from None
        grid = paper_grid(dataset, flag_value(expanded, "weight_bits", defaults.WEIGHT_BITS)) \
            if masked else {}
    if grid is None or isinstance(grid, str):
        grid = parse_grid(grid)
    else:
        grid = parse_grid(";".join(f"{k}={','.join(map(str, v))}" for k, v in grid.items()))
    clash = sorted(k for k in grid if any(k in _flag_names(a) for a in extra))
    if clash:
        raise ValueError(f"{clash} set both by --grid and by an extra flag")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={seeds}: give at least one seed, each once")
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


def _log_path(sweep_dir, output_dir):
    name = os.path.relpath(output_dir, sweep_dir).replace(os.sep, "__")
    return os.path.join(sweep_dir, LOGS, name + ".log")


def run_sweep(runs, sweep_dir, parallel=1, poll_s=0.2, echo=print):
    """Runs every unfinished run, `parallel` at a time; each run's output goes to a log file.

    Returns:
        {"done": [...], "skipped": [...], "failed": [...]} of output dirs.
    """
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}: expected at least 1")
    status = {"done": [], "skipped": [], "failed": []}
    pending = []
    for out, argv in runs:
        if rundir.is_finished(out):
            status["skipped"].append(out)
        else:
            pending.append((out, argv))
    os.makedirs(os.path.join(sweep_dir, LOGS), exist_ok=True)
    active = []  # (process, output_dir, log file, start time)
    try:
        while pending or active:
            while pending and len(active) < parallel:
                out, argv = pending.pop(0)
                log = open(_log_path(sweep_dir, out), "a")
                echo(f"[start] {out}  (log {log.name})")
                active.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT),
                               out, log, time.time()))
            for item in [a for a in active if a[0].poll() is not None]:
                proc, out, log, start = item
                log.close()
                active.remove(item)
                ok = proc.returncode == 0
                status["done" if ok else "failed"].append(out)
                verdict = "done" if ok else f"FAILED rc={proc.returncode}"
                echo(f"[{verdict}] {out} ({time.time() - start:.0f} s)")
            if active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for proc, out, log, _ in active:
            proc.terminate()
            proc.wait()
            log.close()
            status["failed"].append(out)
        raise
    finally:
        rundir.write_json(os.path.join(sweep_dir, SWEEP_JSON), {
            "runs": [{"output_dir": out, "argv": argv} for out, argv in runs], **status})
    return status


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m fqat_tf.sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagfile", required=True, action="append",
                        help="an experiment's flagfile or a glob of them (quote it); repeatable")
    parser.add_argument("--sweep_dir", required=True, help="folder of the run directories")
    parser.add_argument("--test_domains", default="all", help="all | a,b | a+b,c+d")
    parser.add_argument("--seeds", default=",".join(map(str, defaults.SEEDS)))
    parser.add_argument("--grid", default="", help='"name=v1,v2;name2=v3" or "paper"')
    parser.add_argument("--dry_run", action="store_true", help="list the runs, start none")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time (each may claim the whole accelerator)")
    # Internal: the training program's argv prefix, so tests can substitute a stand-in.
    parser.add_argument("--train_command", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    command = shlex.split(args.train_command) if args.train_command else TRAIN_COMMAND
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel={args.parallel}: expected at least 1")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        runs = [run for flagfile in expand_flagfiles(args.flagfile)
                for run in plan(flagfile, args.sweep_dir, args.test_domains, seeds,
                                args.grid or None, extra, command)]
    except (ValueError, FileNotFoundError) as e:
        print(f"fqat_tf.sweep: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for out, run_argv in runs:
            state = "finished" if rundir.is_finished(out) else "to run"
            print(f"[{state}] {shlex.join(run_argv)}")
        print(f"{len(runs)} runs planned")
        return 0
    try:
        status = run_sweep(runs, args.sweep_dir, args.parallel)
    except KeyboardInterrupt:
        print(f"sweep {args.sweep_dir}: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130
    print(f"sweep {args.sweep_dir}: {len(status['done'])} done, {len(status['skipped'])} "
          f"skipped (already finished), {len(status['failed'])} failed")
    for out in status["failed"]:
        print(f"  failed: {out} (log {_log_path(args.sweep_dir, out)})")
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
