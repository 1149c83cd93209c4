"""Starting a sweep's runs: conflict checks, local processes on CPU or GPU groups, or commands.

`run_states` asks the training program about every planned run whose directory exists, so
a directory that holds a run with other settings is a conflict, never "already finished".
`execute` then lists the plan (`--dry_run`), prints one shell command per run to start
(`--launcher=commands`), or runs them here (`run_sweep`): `parallel` at a time on the
default devices, or one per GPU group with only that group visible.
"""
import concurrent.futures
import os
import shlex
import subprocess
import sys
import time

from fqat_tf import defaults
from fqat_tf import devices
from fqat_tf import rundir
from fqat_tf.errors import UserError

SWEEP_JSON = "sweep.json"
LOGS = "logs"
# The training program's answer to `<run argv> --check_only` for a directory holding a run
# with other settings (0: free or the same settings; 1, 2: bad input).
CHECK_ONLY = "--check_only"
EXIT_CONFLICT = 3


class LaunchError(UserError):
    """A planned run the training program refuses before anything starts, named."""


def _log_path(sweep_dir, output_dir):
    name = os.path.relpath(output_dir, sweep_dir).replace(os.sep, "__")
    return os.path.join(sweep_dir, LOGS, name + ".log")


def _check(argv):
    """Asks the training program whether a run's directory is free for `argv`'s settings."""
    proc = subprocess.run([*argv, CHECK_ONLY], capture_output=True, text=True)
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    # The message that names the culprit, not a hint printed after it or TensorFlow's logging.
    named = [line for line in lines if "error" in line.lower()] or lines
    return proc.returncode, (named[-1] if named else "")


def run_states(runs, parallel=defaults.SWEEP_CHECK_PARALLEL):
    """The state of every planned run: "to run", "finished" or "conflict".

    A run whose directory does not exist is free. For every other one the training program
    itself is asked (`<run argv> --check_only`: exit 0 when the directory is free or holds a
    run with the same settings, `EXIT_CONFLICT` when it holds a run with other settings),
    since it alone resolves flags into settings; a finished run with other settings is a
    conflict, never "finished".

    Returns:
        {output_dir: (state, detail)}, detail naming what differs for a conflict.

    Raises:
        LaunchError: the training program refuses a run's flags (exit 1 or 2), naming the run
            and its message, before anything starts.
    """
    existing = [(out, argv) for out, argv in runs if os.path.exists(out)]
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        answers = dict(zip([out for out, _ in existing],
                           pool.map(_check, [argv for _, argv in existing])))
    states = {}
    for out, _ in runs:
        code, detail = answers.get(out, (0, ""))
        if code == EXIT_CONFLICT:
            states[out] = ("conflict", detail)
        elif code != 0:
            raise LaunchError(f"{out}: the training program refuses this run (exit {code}): "
                             f"{detail}")
        else:
            states[out] = ("finished" if rundir.is_finished(out) else "to run", detail)
    return states


def run_sweep(runs, sweep_dir, states, parallel=1, groups=None, manifest=SWEEP_JSON,
              poll_s=0.2, echo=print):
    """Runs every run whose state is "to run"; each run's output goes to a log file.

    Args:
        runs: the planned (output_dir, argv).
        sweep_dir: the sweep folder (logs and the manifest go there).
        states: `run_states(runs)`.
        parallel: runs at a time without `groups`.
        groups: GPU groups (`devices.device_groups`): one run per group at a time, with only
            its GPUs visible; None runs on the default devices.
        manifest: the file in `sweep_dir` that records the plan and the outcome.

    Returns:
        {"done", "skipped", "failed", "conflict"}: lists of output dirs.
    """
    status = {"done": [], "skipped": [], "failed": [], "conflict": []}
    pending = []
    for out, argv in runs:
        state = states[out][0]
        if state == "to run":
            pending.append((out, argv))
        else:
            status["conflict" if state == "conflict" else "skipped"].append(out)
    free = list(groups) if groups else [None] * parallel
    os.makedirs(os.path.join(sweep_dir, LOGS), exist_ok=True)
    active = []  # (process, output_dir, log file, start time, group)
    try:
        while pending or active:
            while pending and free:
                (out, argv), group = pending.pop(0), free.pop(0)
                log = open(_log_path(sweep_dir, out), "a")
                where = f" on GPU {','.join(group)}" if group else ""
                echo(f"[start] {out}{where}  (log {log.name})")
                env = devices.child_env(group) if group else None
                active.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                env=env), out, log, time.time(), group))
            for item in [a for a in active if a[0].poll() is not None]:
                proc, out, log, start, group = item
                log.close()
                active.remove(item)
                free.append(group)
                ok = proc.returncode == 0
                status["done" if ok else "failed"].append(out)
                verdict = "done" if ok else f"FAILED rc={proc.returncode}"
                echo(f"[{verdict}] {out} ({time.time() - start:.0f} s)")
            if active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for proc, out, log, _, _ in active:
            proc.terminate()
            proc.wait()
            log.close()
            status["failed"].append(out)
        raise
    finally:
        rundir.write_json(os.path.join(sweep_dir, manifest), {
            "runs": [{"output_dir": out, "argv": argv} for out, argv in runs],
            "conflict_details": {out: states[out][1] for out in status["conflict"]}, **status})
    return status


def shell_commands(runs, states, env=None):
    """One self-contained shell line per run to start (for a Slurm array or GNU parallel).

    Each line changes to this working directory and sets the environment a run needs
    (allow-growth, and PYTHONPATH when the sweep has one), so it runs from any shell; the
    scheduler sets CUDA_VISIBLE_DEVICES.
    """
    env = dict(devices.ALLOW_GROWTH, **({} if env is None else env))
    prefix = f"cd {shlex.quote(os.getcwd())} && env " + " ".join(
        f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return [f"{prefix} {shlex.join(argv)}" for out, argv in runs
            if states[out][0] == "to run"]


def _summary(label, status):
    return (f"{label}: {len(status['done'])} done, {len(status['skipped'])} skipped (already "
            f"finished), {len(status['failed'])} failed, {len(status['conflict'])} conflict")


MODES = ("run", "dry_run", "commands")


def execute(runs, label, sweep_dir, mode="run", parallel=1, groups=None, manifest=SWEEP_JSON):
    """Lists, prints or runs one plan; returns the exit code (1: a failure or a conflict).

    Args:
        runs: the planned (output_dir, argv).
        label: names the plan in the summary ("sweep runs/x", "phase 1").
        sweep_dir: the sweep folder.
        mode: "run" (here, `run_sweep`), "dry_run" (list every run with its state) or
            "commands" (print `shell_commands`, summary on stderr).
        parallel, groups, manifest: see `run_sweep`.
    """
    states = run_states(runs, max(defaults.SWEEP_CHECK_PARALLEL, parallel))
    conflicts = [out for out, _ in runs if states[out][0] == "conflict"]
    for out in conflicts:
        print(f"[CONFLICT] {out} holds a run with other settings: {states[out][1]}",
              file=sys.stderr)
    if mode == "dry_run":
        for out, argv in runs:
            print(f"[{states[out][0]}] {shlex.join(argv)}")
        print(f"{label}: {len(runs)} runs planned, {len(conflicts)} conflict")
        return 1 if conflicts else 0
    if mode == "commands":
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
        lines = shell_commands(runs, states, env)
        for line in lines:
            print(line)
        print(f"{label}: {len(lines)} to run, {len(runs) - len(lines) - len(conflicts)} "
              f"finished (no command), {len(conflicts)} conflict", file=sys.stderr)
        return 1 if conflicts else 0
    status = run_sweep(runs, sweep_dir, states, parallel, groups, manifest)
    print(_summary(label, status))
    for out in status["failed"]:
        print(f"  failed: {out} (log {_log_path(sweep_dir, out)})")
    for out in status["conflict"]:
        print(f"  conflict: {out}: {states[out][1]}")
    return 1 if status["failed"] or status["conflict"] else 0
