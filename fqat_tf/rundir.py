"""The layout of a run directory, and atomic writes into it.

A run directory (one `python -m fqat_tf.train` invocation, one stage) holds:

    flags.json         resolved settings of the run (every flag, after flagfiles and --smoke)
    checkpoints/       tf.train.CheckpointManager files: weights, both optimizers, freeze masks
                       and sign windows, the data iterator, the step counter
    tb/                TensorBoard event files
    evals.jsonl        one JSON record per evaluation: {"step", "val/<d>", "test/<d>",
                       "val_avg", "test_avg"}
    disorder.csv       step,variable,disorder,flat_disorder,mask: one row per scale variable per
                       freeze window K: the gradient disorder of its g_va and of its g_flat over
                       the window, and the mask decided at that step (1 = g_va flows)
    gradients.csv      step,variable,g_va,g_flat,applied: one row per scale variable per window
                       of N steps (N = --gradient_window, default K), each column the sum over
                       the window's steps of that scale's global first-pass gradient g_va, its
                       second-pass gradient g_flat and the gradient handed to its optimizer
                       (for a per-channel step, summed over the channels too); `step` is the
                       window's last step (paper Fig. 2, 4, 5)
    model.keras        the selected model (training-domain validation), fake-quant for QAT
    results.json       written last; its presence marks the run finished (see `write_results`)
    disorder.png       gradient disorder of every scale over training (paper Fig. 3)
    freeze_timeline.png  mask of every scale over training (paper Fig. 4)
    gradients.png      cumulative g_va and g_flat of every scale (paper Fig. 2, 5)
    run.lock           held (flock) by the process that trains the run, for its whole life

`results.json` keys: "dataset", "method", "quantizer", "weight_bits", "activation_bits",
"test_domains" (list), "seed", "hparams" (dict: lr, rho, alpha, freeze_interval,
freeze_threshold, ...), "selection" (text naming the rule), "selected_step", "val" and "test"
(dicts domain -> accuracy in [0, 1] at the selected step), "val_avg", "test_avg",
"wall_time_s", "steps", "final_masks" (dict scale variable -> 0/1, empty for float runs).
"""
import contextlib
import csv
import fcntl
import io
import json
import os
import tempfile

from fqat_tf.errors import UserError

FLAGS_JSON = "flags.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
EVALS = "evals.jsonl"
DISORDER_CSV = "disorder.csv"
MODEL = "model.keras"
RESULTS = "results.json"
DISORDER_PNG = "disorder.png"
FREEZE_PNG = "freeze_timeline.png"
GRADIENTS_CSV = "gradients.csv"
GRADIENTS_PNG = "gradients.png"
RUN_LOCK = "run.lock"
# What a run writes: its files, and the folders it owns entirely.
RUN_FILES = (FLAGS_JSON, EVALS, DISORDER_CSV, MODEL, RESULTS, DISORDER_PNG, FREEZE_PNG,
             GRADIENTS_CSV, GRADIENTS_PNG, RUN_LOCK)
RUN_FOLDERS = (CHECKPOINTS, TENSORBOARD)


class RunError(UserError):
    """A run directory that cannot be used as asked: in use, other settings, damaged files."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data, mode="w"):
    """Writes `data` to `path` through a temporary file in the same folder, then renames.

    The file gets the permissions a plain `open(path, "w")` would give it (0666 less the
    umask), not the owner-only mode of the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """The JSON object in `path`; a RunError naming the file if it is missing or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: damaged, not valid JSON ({e}); delete the run directory or "
                       f"restore the file") from None


@contextlib.contextmanager
def exclusive(lock_path, wait=True):
    """Holds an exclusive advisory lock on `lock_path` (created if needed) for the block.

    Another process entering the block with the same path waits until this one leaves (or,
    with `wait=False`, gets BlockingIOError at once); the lock is released when the process
    dies, so a killed run never leaves a stale lock. Yields the open lock file (read/write).
    """
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_finished(run_dir):
    """A run is finished once its results.json exists."""
    return os.path.isfile(os.path.join(run_dir, RESULTS))


def read_results(run_dir):
    """The results of a finished run; a clear error if the run is not finished."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: not a finished run (no {RESULTS})")
    return read_json(path)


def read_evals(run_dir):
    """Evaluation records of a run, in order (empty if none yet).

    Raises:
        RunError: a line that is not a JSON record with a "step", naming the file and line.
    """
    path = os.path.join(run_dir, EVALS)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise RunError(f"{path}:{number}: damaged evaluation record {line.strip()[:60]!r}; "
                               f"delete the run directory or restore the file") from None
            records.append(record)
    return records


def write_evals(run_dir, records):
    """Writes every evaluation record of a run (one JSON line each), atomically."""
    atomic_write(os.path.join(run_dir, EVALS),
                 "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_csv(path, header):
    """The rows of a CSV file the trainer wrote (`header` first), as lists of strings.

    Missing file: no rows. An older file with fewer columns is padded with empty strings.

    Raises:
        RunError: the file does not start with a prefix of `header` or its first column (the
            step) is not an integer, naming the file and line.
    """
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != list(header[:len(rows[0])]):
        raise RunError(f"{path}: damaged, expected the header {','.join(header)}; delete the run "
                       f"directory or restore the file")
    width = len(rows[0])
    for number, row in enumerate(rows[1:], 2):
        if len(row) != width or not row[0].lstrip("-").isdigit():
            raise RunError(f"{path}:{number}: damaged row {','.join(row)[:60]!r}; delete the run "
                           f"directory or restore the file")
    return [row + [""] * (len(header) - width) for row in rows[1:]]


def write_csv(path, header, rows):
    """Writes a header and rows as CSV, atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, out.getvalue())


def _lock_holder(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_lock(run_dir, wait=False):
    """Holds `run_dir/run.lock` (an exclusive flock) for the block: one process per run.

    The holder's pid is written into the file. The lock dies with its process, so a killed run
    never leaves a stale lock. If the block raises before the run wrote its settings
    (flags.json), the lock file, and the folders this call created if empty, are removed again, so
    a run refused on bad input leaves nothing behind.

    Args:
        run_dir: the run directory (created if needed).
        wait: wait for the holder to finish (runs sharing a cached ERM stage) instead of
            refusing at once.

    Raises:
        RunError: the run directory is held by another process (`wait=False`), naming its pid.
    """
    created_dirs = []  # the folders this call creates, deepest first
    folder = os.path.abspath(run_dir)
    while not os.path.isdir(folder):
        created_dirs.append(folder)
        folder = os.path.dirname(folder)
    path = os.path.join(run_dir, RUN_LOCK)
    created_lock = not os.path.exists(path)
    held = contextlib.ExitStack()
    try:
        handle = held.enter_context(exclusive(path, wait=wait))
    except BlockingIOError:
        raise RunError(f"{run_dir} is in use by another process (pid {_lock_holder(path)}, "
                       f"holding {RUN_LOCK}); wait for it to finish or choose another "
                       f"--output_dir") from None
    with held:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if not os.path.exists(os.path.join(run_dir, FLAGS_JSON)):
                if created_lock:
                    os.unlink(path)
                for folder in created_dirs:
                    if os.path.isdir(folder) and not os.listdir(folder):
                        os.rmdir(folder)
            raise


def owning_run(path):
    """The run directory `path` is one of the own files of (or inside a folder of), else None.

    A run directory is a folder holding flags.json; its own files are `RUN_FILES` and whatever
    lies under `RUN_FOLDERS`. Other programs use this to refuse writing over a run's files.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if name in RUN_FILES and os.path.isfile(os.path.join(parent, FLAGS_JSON)):
        return parent
    folder = parent
    while os.path.dirname(folder) != folder:
        above, sub = os.path.split(folder)
        if sub in RUN_FOLDERS and os.path.isfile(os.path.join(above, FLAGS_JSON)):
            return above
        folder = above
    return None
