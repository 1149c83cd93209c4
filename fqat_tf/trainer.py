"""The stages of one training run in run directories: locking, resume, selection, results.

`run(settings)` is what `python -m fqat_tf.train` calls with its resolved flags; library users
who want the plain Keras path use `FQATModel.fit(..., callbacks=[DisorderFreezeCallback(...)])`
directly. Here the loop is written out (one compiled step per call) so that every evaluation
point checkpoints the weights, both optimizers, the freeze state and the data position
together with the run's files, and a resumed run continues exactly where the interrupted one
stopped (docs/algorithm.md §4).

A run directory belongs to one process at a time (`rundir.run_lock`) and to one setting: a
directory holding a run with other settings is refused, finished or not. Inputs (data, the
initial checkpoint, the ERM model) are read and checked before anything is written into it.
"""
import contextlib
import hashlib
import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from fqat_tf import calibration, checkpoints, data, defaults, methods, models, rundir, runtime
from fqat_tf.progress import Progress
from fqat_tf.ewgs import EWGSDeltaCallback
from fqat_tf.fqat_model import FQATModel
from fqat_tf.freeze import DisorderFreezeCallback
from fqat_tf.quantize import quantize_model
from fqat_tf.storage import int8_storage_model

log = logging.getLogger(__name__)

RunError = rundir.RunError
# Settings that decide what the ERM stage computes; its cache key hashes exactly these.
ERM_KEYS = ("dataset", "data_dir", "test_domains", "backbone", "width", "image_size", "init",
            "erm_steps", "batch_per_domain", "lr", "weight_decay", "weight_decay_mode", "seed",
            "holdout_fraction", "skip_bad_files", "eval_every", "mixed_precision", "smoke")
# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_KEYS = ("output_dir", "erm_cache_dir", "verbose", "eval_batch_size", "jit_compile",
                  "strategy", "deterministic")
# Settings added after runs were made: settings without one (an older flags.json, an ERM
# stage's) hold its default.
ADDED_SETTINGS = {"calibration_source": defaults.CALIBRATION_SOURCE,
                  "shared_inputs": defaults.SHARED_INPUTS}
DISORDER_HEADER = ("step", "variable", "disorder", "flat_disorder", "mask")
GRADIENTS_HEADER = ("step", "variable", "g_va", "g_flat", "applied")


def quantized(s):
    """Whether the run's method trains a quantized model."""
    return methods.get(s["method"]).quantized


def erm_settings(s):
    """Settings of the ERM stage a quantized run starts from."""
    erm = {k: s[k] for k in ERM_KEYS}
    erm.update(method="erm", steps=s["erm_steps"], quantizer=None, eval_after=0)
    for k in RESUMABLE_KEYS:
        erm.setdefault(k, s.get(k))
    return erm


def erm_hash(s):
    """Cache key of an ERM stage: a hash of the settings that decide its result."""
    blob = json.dumps({k: s[k] for k in ERM_KEYS}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def check_settings(s, run_dir):
    """Whether `run_dir` can hold this run: "free" (no run yet) or "same" (its settings).

    Raises:
        RunError: the directory holds a run with other settings (finished or not), naming the
            settings that differ.
    """
    path = os.path.join(run_dir, rundir.FLAGS_JSON)
    if not os.path.exists(path):
        return "free"
    old = rundir.read_json(path)

    def value(settings, key):  # a setting added later holds its default where it is missing
        return settings.get(key, ADDED_SETTINGS.get(key))

    differ = sorted(k for k in set(old) | set(s)
                    if k not in RESUMABLE_KEYS and value(old, k) != value(s, k))
    if differ:
        shown = ", ".join(f"{k}: {value(old, k)!r} there, {value(s, k)!r} here"
                          for k in differ[:4])
        raise RunError(f"{run_dir} holds a {'finished ' if rundir.is_finished(run_dir) else ''}"
                       f"run with other settings ({shown}{', ...' if len(differ) > 4 else ''});"
                       f" choose another --output_dir or delete that run")
    return "same"


class Inputs:
    """The data of a run, read and checked once and shared by its stages.

    The training batch of step n is a pure function of the seed and n (`fqat_tf.data`), so a
    stage starts its stream at the step it resumes from and no iterator is checkpointed.
    """

    def __init__(self, s):
        self.s = s
        self.splits = data.load_splits(
            s["dataset"], data_dir=s["data_dir"], test_domains=s["test_domains"],
            holdout_fraction=s["holdout_fraction"], seed=s["seed"],
            skip_bad_files=s["skip_bad_files"], image_size=s["image_size"])
        self.eval_streams = data.eval_streams(self.splits, s["eval_batch_size"])

    @property
    def num_classes(self):
        return self.splits.info.num_classes

    def train_stream(self, start_step=0):
        """The global batches from `start_step` on, in this process."""
        return data.train_stream(self.splits, self.s["batch_per_domain"], seed=self.s["seed"],
                                 start_step=start_step)

    def distributed(self, strategy, start_step):
        """The batches from `start_step` on as `strategy` feeds its replicas: each worker
        reads only its replicas' rows of every global batch."""
        if self.s["strategy"] == "default":
            return self.train_stream(start_step)
        return strategy.distribute_datasets_from_function(data.train_dataset_fn(
            self.splits, self.s["batch_per_domain"], seed=self.s["seed"], start_step=start_step))


def run(s):
    """Runs every stage a setting needs; returns the final stage's results dict.

    Raises:
        RunError: the run directory is in use, holds another setting, or is damaged.
        DataError: the data cannot be read.
        runtime.WorkerLost: another worker of a multi-worker run stopped.
    """
    out = s["output_dir"]
    strategy = runtime.strategy(s["strategy"])
    # The workers of a multi-worker run share its directory; the chief holds its lock.
    chief = runtime.is_chief(strategy)
    with rundir.run_lock(out) if chief else contextlib.nullcontext(), \
            runtime.worker_loss_named(strategy, out):
        check_settings(s, out)
        if runtime.chief_decides(strategy, rundir.is_finished(out)):
            log.info("%s is finished; not rerun", out)
            return rundir.read_results(out)
        inputs = Inputs(s)
        start_from = None
        if quantized(s) and s["erm_steps"] > 0:
            erm = erm_settings(s)
            erm_dir = erm["output_dir"] = os.path.join(s["erm_cache_dir"], erm_hash(s))
            # Runs of a parallel sweep that share this stage wait here while one trains it.
            with rundir.run_lock(erm_dir, wait=True) if chief else contextlib.nullcontext():
                check_settings(erm, erm_dir)
                if runtime.chief_decides(strategy, rundir.is_finished(erm_dir)):
                    log.info("ERM stage: reusing %s", erm_dir)
                else:
                    train_stage(erm, erm_dir, inputs)
            start_from = os.path.join(erm_dir, rundir.MODEL)
        return train_stage(s, out, inputs, start_from=start_from)


def _load_start(path):
    if not os.path.isfile(path):
        raise RunError(f"ERM model {path} is missing; delete its cache folder "
                       f"{os.path.dirname(path)} to train the stage again")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is this file's problem
        raise RunError(f"{path}: cannot be loaded as a Keras model ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); delete its cache folder "
                       f"{os.path.dirname(path)} to train the stage again") from None


def _build(s, splits, start_from):
    """The model a stage trains: backbone (+ init) or the ERM model, quantized for QAT."""
    if start_from is not None:
        base = _load_start(start_from)
    else:
        info = splits.info
        base = models.build_backbone(s["backbone"], info.num_classes, info.input_shape,
                                     width=s["width"])
        log.info("init: %s", models.load_init(base, s["init"]))
    if not quantized(s):
        return base
    qmodel = quantize_model(base, weight_bits=s["weight_bits"],
                            activation_bits=s["activation_bits"], quantizer=s["quantizer"],
                            per_channel=s["per_channel"], act_grad_count=s["act_grad_count"],
                            shared_inputs=s.get("shared_inputs", ADDED_SETTINGS["shared_inputs"]),
                            quantizer_kwargs={"delta": s["ewgs_delta"],
                                              "delta_mode": s["ewgs_delta_mode"]}
                            if s["quantizer"] == "ewgs" else None)
    if s.get("int8_storage"):
        qmodel = int8_storage_model(qmodel)
    return qmodel


def _optimizer(s):
    decoupled = s.get("weight_decay_mode", defaults.WEIGHT_DECAY_MODE) == "decoupled"
    return keras.optimizers.Adam(s["lr"], weight_decay=(s["weight_decay"] or None)
                                 if decoupled else None)


def _compile(s, qmodel):
    is_q = quantized(s)
    coupled = s.get("weight_decay_mode", defaults.WEIGHT_DECAY_MODE) == "coupled"
    fq = FQATModel(qmodel, s["method"], rho=s.get("rho", 0.0), alpha=s.get("alpha", 0.0),
                   freeze_interval=s.get("freeze_interval") or 2, record_signs=is_q,
                   weight_decay=s["weight_decay"] if coupled else 0.0,
                   track_scale_gradients=is_q)
    fq.compile(optimizer=_optimizer(s),
               scale_optimizer=keras.optimizers.Adam(s["scale_lr"]) if is_q else None,
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
               jit_compile=bool(s["jit_compile"]) and not s["smoke"],
               run_eagerly=bool(s["smoke"]))
    return fq


def _stage_line(s, run_dir):
    what = ("ERM" if s["method"] == "erm" else s["method"]) if not quantized(s) else (
        f"{s['method']} {s['quantizer']} W{s['weight_bits']}A{s['activation_bits']}"
        + (" int8 storage" if s.get("int8_storage") else ""))
    return f"[{what}] {s['steps']} steps, test {','.join(map(str, s['test_domains']))}, " \
           f"seed {s['seed']} -> {run_dir}"


def train_stage(s, run_dir, inputs, start_from=None):
    """Trains (or resumes) one stage in `run_dir`, whose lock the caller (the chief) holds.

    The model is built (the init checkpoint or the ERM model read) before the run's settings
    are written, so bad input leaves the directory as it was. In a multi-worker run every
    worker trains; only the chief writes the run's files, and the others write their
    checkpoints to a private folder they remove (TensorFlow's multi-worker rule).
    """
    keras.utils.set_random_seed(s["seed"])
    if s["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    strategy = runtime.strategy(s["strategy"])
    chief = runtime.is_chief(strategy)
    with strategy.scope():
        qmodel = _build(s, inputs.splits, start_from)
        fq = _compile(s, qmodel)
        state = {name: tf.Variable(value, dtype=dtype, trainable=False, name=name)
                 for name, value, dtype in (("step", 0, tf.int64), ("wall_time_s", 0.0, tf.float64),
                                            ("loss_start", np.nan, tf.float64),
                                            ("loss_peak", np.nan, tf.float64))}
    if chief and not os.path.exists(os.path.join(run_dir, rundir.FLAGS_JSON)):
        rundir.write_json(os.path.join(run_dir, rundir.FLAGS_JSON), s)
    if s["verbose"] and chief:
        print(_stage_line(s, run_dir), flush=True)
    # The variables list as well: a Keras layer's TensorFlow checkpoint follows its attributes
    # only, and some state lives in lists or dicts (an EWGS quantizer's delta).
    ckpt = tf.train.Checkpoint(model=fq, variables=list(fq.variables),
                               optimizer=fq.optimizer, **state)
    if fq.scale_optimizer is not None:
        ckpt.scale_optimizer = fq.scale_optimizer
    saved = checkpoints.RunCheckpoints(ckpt, os.path.join(run_dir, rundir.CHECKPOINTS),
                                       strategy)
    restored = saved.restore()
    if restored is None:
        files = _RunFiles(run_dir, -1)
        if quantized(s):
            stream = inputs.train_stream()
            calibration.calibrate_scales(qmodel, stream, s["calibration_batches"],
                                         method=s["calibration"],
                                         source=s["calibration_source"])
            calibration.calibrate_ranges(qmodel, stream, s["calibration_batches"])
    else:
        files = _RunFiles(run_dir, restored)
        log.info("resumed %s at step %d", run_dir, restored)
    state["iterator"] = iter(inputs.distributed(strategy, restored or 0))
    results = _Stage(s, run_dir, fq, inputs, files, saved, state, chief).loop()
    # Every worker leaves the stage once the chief has written its files (the next stage
    # reads the model it selected).
    runtime.chief_decides(strategy, 0)
    return results


class _RunFiles:
    """The run's evaluation records and CSV rows, rewritten atomically at each checkpoint.

    Loaded up to the checkpoint a run resumes from, so rows written after it (by a process that
    died before its next checkpoint) are dropped and written again.
    """

    def __init__(self, run_dir, step):
        self.run_dir = run_dir
        self.records = [r for r in rundir.read_evals(run_dir) if r["step"] <= step]
        self.rows = {}
        for name, header in ((rundir.DISORDER_CSV, DISORDER_HEADER),
                             (rundir.GRADIENTS_CSV, GRADIENTS_HEADER)):
            rows = rundir.read_csv(os.path.join(run_dir, name), header)
            self.rows[name] = [r for r in rows if int(r[0]) <= step]

    def write(self):
        rundir.write_evals(self.run_dir, self.records)
        for name, header in ((rundir.DISORDER_CSV, DISORDER_HEADER),
                             (rundir.GRADIENTS_CSV, GRADIENTS_HEADER)):
            if self.rows[name]:
                rundir.write_csv(os.path.join(self.run_dir, name), header, self.rows[name])


def divergence(records, loss_start, loss_peak, num_classes):
    """Why a run counts as diverged, or None.

    Diverged: the training loss of an evaluation window rose above its first window's by
    `defaults.DIVERGENCE_LOSS_FACTOR`, or an evaluation after the first has a training-domain
    validation accuracy at chance (at most `defaults.DIVERGENCE_CHANCE_FACTOR` / classes).
    """
    if np.isfinite(loss_peak) and np.isfinite(loss_start) and \
            loss_peak > defaults.DIVERGENCE_LOSS_FACTOR * max(loss_start, 1e-12):
        return (f"training loss rose to {loss_peak:.4g}, more than "
                f"{defaults.DIVERGENCE_LOSS_FACTOR:g}x its first window's {loss_start:.4g}")
    chance = defaults.DIVERGENCE_CHANCE_FACTOR / num_classes
    for r in records[1:]:
        if r["val_avg"] <= chance:
            return (f"validation accuracy {r['val_avg']:.4f} at step {r['step']} is at chance "
                    f"({num_classes} classes)")
    return None


class _Stage:
    """The training loop of one stage and the writing of its results."""

    def __init__(self, s, run_dir, fq, inputs, files, saved, state, chief):
        self.s, self.run_dir, self.fq, self.inputs = s, run_dir, fq, inputs
        self.files, self.saved, self.state, self.chief = files, saved, state, chief
        self.is_q = quantized(s)
        self.gradient_window = s.get("gradient_window") or s.get("freeze_interval") or 1
        self.warned = False

    def _callbacks(self):
        cbs = []
        if self.is_q:
            self.freeze_cb = DisorderFreezeCallback(interval=self.s.get("freeze_interval"),
                                                    threshold=self.s.get("freeze_threshold")
                                                    or 0.0)
            cbs.append(self.freeze_cb)
            if self.s["quantizer"] == "ewgs" and self.s["ewgs_delta_mode"] == "hessian":
                cbs.append(EWGSDeltaCallback(next(iter(self.inputs.train_stream())),
                                             interval=self.s["ewgs_hessian_interval"],
                                             seed=self.s["seed"]))
        return keras.callbacks.CallbackList(cbs, model=self.fq)

    def _decision_rows(self, seen):
        """disorder.csv rows and TensorBoard scalars of the decisions taken since `seen`."""
        for record in self.freeze_cb.records[seen:]:
            with self.writer.as_default(step=record["step"]):
                for name, d in record["disorder"].items():
                    flat = record["flat_disorder"].get(name)
                    self.files.rows[rundir.DISORDER_CSV].append(
                        [record["step"], name, f"{d:.6f}", "" if flat is None else f"{flat:.6f}",
                         int(record["mask"][name])])
                    tf.summary.scalar(f"disorder/{name}", d)
                    tf.summary.scalar(f"mask/{name}", record["mask"][name])
                    if flat is not None:
                        tf.summary.scalar(f"flat_disorder/{name}", flat)
                tf.summary.scalar("frozen_fraction",
                                  1.0 - float(np.mean(list(record["mask"].values()))))
        return len(self.freeze_cb.records)

    def _gradient_rows(self, n):
        sums = self.fq.scale_gradient_sums
        values = sums.numpy()
        for i, name in enumerate(self.fq.freeze_state.scale_names):
            self.files.rows[rundir.GRADIENTS_CSV].append(
                [n, name] + [f"{v:.9g}" for v in values[:, i]])
        sums.assign(np.zeros_like(values))

    def _train_step(self, train_fn, iterator, n):
        try:
            return _named_input_errors(train_fn, iterator)
        except FloatingPointError as e:
            last = self.saved.latest
            raise RunError(f"{self.run_dir}: {e} The run stopped at step {n + 1}; its last "
                           f"checkpoint ({os.path.basename(last) if last else 'none'}) is "
                           f"intact.") from None

    def _warn(self, reason, n):
        if reason and self.chief and not self.warned:
            self.warned = True
            # On the progress output whatever --verbose says: it decides whether the run
            # is worth its remaining steps.
            print(f"WARNING: step {n}: the run looks diverged: {reason}", flush=True)

    def _window_end(self, n, logs):
        """Evaluation, model selection, divergence check and checkpoint at step n."""
        s, st = self.s, self.state
        loss = logs.get("loss", np.nan)
        if np.isnan(st["loss_start"].numpy()):
            st["loss_start"].assign(loss)
        st["loss_peak"].assign(np.nanmax([st["loss_peak"].numpy(), loss]))
        with self.writer.as_default(step=n):
            for k, v in logs.items():
                tf.summary.scalar(f"train/{k}", v)
            for v in self.fq.scale_variables:
                tf.summary.scalar(f"scale/{v.path}", float(np.mean(v.numpy())))
        self.fq.reset_metrics()
        # Evaluation changes nothing the training depends on: only the chief, who writes the
        # records and the selected model, evaluates.
        if self.chief and (n > s["eval_after"] or n == s["steps"]):
            record = {"step": n, **_named_input_errors(
                data.evaluate, self.fq.qmodel, self.inputs.eval_streams, verbose=0)}
            self.files.records.append(record)
            with self.writer.as_default(step=n):
                for k, v in record.items():
                    if k != "step":
                        tf.summary.scalar(k, v)
            if record["val_avg"] > self.best:
                self.best = record["val_avg"]
                _save_model(self.fq.qmodel, self.run_dir)
            self.progress.message(f"step {n}: val {record['val_avg']:.4f} "
                                  f"test {record['test_avg']:.4f}")
        self._warn(self._divergence(), n)
        st["wall_time_s"].assign(self.wall_before + time.time() - self.started)
        if self.chief:
            self.files.write()
        self.saved.save(n)

    def _divergence(self):
        return divergence(self.files.records, float(self.state["loss_start"].numpy()),
                          float(self.state["loss_peak"].numpy()), self.inputs.num_classes)

    def loop(self):
        s, st, fq = self.s, self.state, self.fq
        self.started, self.wall_before = time.time(), float(st["wall_time_s"].numpy())
        total = s["steps"]
        callbacks = self._callbacks()
        self.writer = (tf.summary.create_file_writer(os.path.join(self.run_dir,
                                                                  rundir.TENSORBOARD))
                       if self.chief else tf.summary.create_noop_writer())
        train_fn = fq.make_train_function()
        self.best = max((r["val_avg"] for r in self.files.records), default=-1.0)
        self.progress = Progress(total, verbose=s["verbose"] if self.chief else 0,
                                 num_scales=len(fq.scale_variables) if self.is_q else None,
                                 every=s["eval_every"])
        n = int(st["step"].numpy())
        callbacks.on_train_begin()
        seen = len(self.freeze_cb.records) if self.is_q else 0
        while n < total:
            logs = self._train_step(train_fn, st["iterator"], n)
            st["step"].assign_add(1)
            n += 1
            callbacks.on_train_batch_end(n - 1, logs)
            if self.is_q:
                seen = self._decision_rows(seen)
                if n % self.gradient_window == 0 or n == total:
                    self._gradient_rows(n)
            logs = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in logs.items()}
            self.progress.update(n, logs)
            if n % s["eval_every"] == 0 or n == total:
                self._window_end(n, logs)
        callbacks.on_train_end()
        self.writer.close()
        return self._finish(float(st["wall_time_s"].numpy()))

    def _finish(self, wall_time):
        s, fq = self.s, self.fq
        if not self.chief:
            return {"worker": runtime.worker_index(runtime.strategy(s["strategy"]))}
        chosen = data.select_best(self.files.records)
        state = fq.freeze_state
        reason = self._divergence()
        results = {
            "dataset": s["dataset"], "method": s["method"],
            "quantizer": s["quantizer"] if self.is_q else None,
            "weight_bits": s["weight_bits"] if self.is_q else None,
            "activation_bits": s["activation_bits"] if self.is_q else None,
            "test_domains": list(s["test_domains"]), "seed": s["seed"],
            "hparams": {k: s.get(k) for k in ("lr", "scale_lr", "weight_decay", "rho", "alpha",
                                              "freeze_interval", "freeze_threshold",
                                              "batch_per_domain", "erm_steps")},
            "selection": "best training-domain validation accuracy (val_avg) over evaluations",
            "selected_step": chosen["step"],
            "val": {k[4:]: v for k, v in chosen.items() if k.startswith("val/")},
            "test": {k[5:]: v for k, v in chosen.items() if k.startswith("test/")},
            "val_avg": chosen["val_avg"], "test_avg": chosen["test_avg"],
            "wall_time_s": round(wall_time, 1), "steps": s["steps"],
            "final_masks": ({n: int(m) for n, m in zip(state.scale_names, state.masks.numpy())}
                            if self.is_q else {}),
            "diverged": reason is not None, "divergence": reason,
        }
        if self.is_q:
            from fqat_tf import plots

            plots.plot_run(self.run_dir)
        rundir.write_json(os.path.join(self.run_dir, rundir.RESULTS), results)
        return results


def _named_input_errors(fn, *args, **kwargs):
    """Calls fn; a TensorFlow error that comes from reading an input file names that file."""
    try:
        return fn(*args, **kwargs)
    except tf.errors.OpError as e:
        error = data.explain_input_error(e)
        if error is None:
            raise
        raise error from None


def _save_model(model, run_dir):
    tmp = os.path.join(run_dir, ".model.tmp.keras")
    model.save(tmp)
    os.replace(tmp, os.path.join(run_dir, rundir.MODEL))
