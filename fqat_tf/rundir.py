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
import fcntl
import json
import os
import tempfile

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
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def exclusive(lock_path):
    """Holds an exclusive advisory lock on `lock_path` (created if needed) for the block.

    Another process entering the block with the same path waits until this one leaves; the
    lock is released when the process dies, so a killed run never leaves a stale lock.
    """
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
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
    """Evaluation records of a run, in order (empty if none yet)."""
    path = os.path.join(run_dir, EVALS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_eval(run_dir, record):
    """Appends one evaluation record (one JSON line, flushed)."""
    with open(os.path.join(run_dir, EVALS), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
