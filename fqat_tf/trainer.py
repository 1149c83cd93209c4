"""One training stage in a run directory, with resume and model selection.

`run(settings)` is what `python -m fqat_tf.train` calls with its resolved flags; library users
who want the plain Keras path use `FQATModel.fit(..., callbacks=[DisorderFreezeCallback(...)])`
directly. Here the loop is written out (one compiled step per call) so that the data iterator
can be checkpointed with the weights, both optimizers and the freeze state, which makes a
resumed run continue exactly where the interrupted one stopped.
"""
import csv
import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from fqat_tf import calibration, data, models, rundir
from fqat_tf.errors import UserError
from fqat_tf.ewgs import EWGSDeltaCallback
from fqat_tf.fqat_model import FQATModel
from fqat_tf.freeze import DisorderFreezeCallback
from fqat_tf.quantize import quantize_model
from fqat_tf.storage import int8_storage_model

FLOAT_METHODS = ("erm", "sagm")
# Settings that decide what the ERM stage computes; its cache key hashes exactly these.
ERM_KEYS = ("dataset", "data_dir", "test_domains", "backbone", "width", "image_size", "init",
            "erm_steps", "batch_per_domain", "lr", "weight_decay", "seed", "holdout_fraction",
            "skip_bad_files", "eval_every", "mixed_precision", "smoke")
# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_KEYS = ("output_dir", "erm_cache_dir", "verbose", "eval_batch_size", "jit_compile",
                  "strategy", "deterministic")


class RunError(UserError):
    """A run directory that cannot be used as asked (settings differ, files missing)."""


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


def run(s):
    """Runs every stage a setting needs; returns the final stage's results dict."""
    if s["method"] in FLOAT_METHODS:
        return train_stage(s, s["output_dir"])
    start_from = None
    if s["erm_steps"] > 0:
        erm = erm_settings(s)
        erm_dir = os.path.join(s["erm_cache_dir"], erm_hash(s))
        erm["output_dir"] = erm_dir
        # Runs of a parallel sweep that share this stage wait here while one of them trains it.
        with rundir.exclusive(erm_dir + ".lock"):
            if rundir.is_finished(erm_dir):
                logging.info("ERM stage: reusing %s", erm_dir)
            train_stage(erm, erm_dir)
        start_from = os.path.join(erm_dir, rundir.MODEL)
    return train_stage(s, s["output_dir"], start_from=start_from)


def _check_flags_file(s, run_dir):
    path = os.path.join(run_dir, rundir.FLAGS_JSON)
    if os.path.exists(path):
        old = rundir.read_json(path)
        differ = sorted(k for k in set(old) | set(s)
                        if k not in RESUMABLE_KEYS and old.get(k) != s.get(k))
        if differ:
            raise RunError(f"{run_dir} holds a run with other settings ({', '.join(differ)}); "
                           f"choose another --output_dir or delete that run")
    rundir.write_json(path, s)


def _strategy(name):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _build(s, splits, start_from):
    """The model a stage trains: backbone (+ init) or the ERM model, quantized for QAT."""
    if start_from is not None:
        base = keras.saving.load_model(start_from, safe_mode=True)
    else:
        info = splits.info
        base = models.build_backbone(s["backbone"], info.num_classes, info.input_shape,
                                     width=s["width"])
        logging.info("init: %s", models.load_init(base, s["init"]))
    if s["method"] in FLOAT_METHODS:
        return base
    qmodel = quantize_model(base, weight_bits=s["weight_bits"],
                            activation_bits=s["activation_bits"], quantizer=s["quantizer"],
                            per_channel=s["per_channel"], act_grad_count=s["act_grad_count"],
                            quantizer_kwargs={"delta": s["ewgs_delta"],
                                              "delta_mode": s["ewgs_delta_mode"]}
                            if s["quantizer"] == "ewgs" else None)
    if s.get("int8_storage"):
        qmodel = int8_storage_model(qmodel)
    return qmodel


def _truncate(run_dir, step):
    """Drops eval and disorder rows written after the checkpoint a run resumes from."""
    records = [r for r in rundir.read_evals(run_dir) if r["step"] <= step]
    rundir.atomic_write(os.path.join(run_dir, rundir.EVALS),
                        "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    path = os.path.join(run_dir, rundir.DISORDER_CSV)
    if os.path.exists(path):
        with open(path) as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        rundir.atomic_write(path, "".join(",".join(r) + "\n" for r in kept))
    return records


def _append_disorder(run_dir, records):
    path = os.path.join(run_dir, rundir.DISORDER_CSV)
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("step,variable,disorder,mask\n")
        for r in records:
            for name, d in r["disorder"].items():
                f.write(f"{r['step']},{name},{float(d):.6f},{int(r['mask'][name])}\n")


def _save_model(model, run_dir):
    tmp = os.path.join(run_dir, ".model.tmp.keras")
    model.save(tmp)
    os.replace(tmp, os.path.join(run_dir, rundir.MODEL))


def _set_seed(s):
    keras.utils.set_random_seed(s["seed"])
    if s["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    if s["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")


def train_stage(s, run_dir, start_from=None):
    """Trains (or resumes, or skips if finished) one stage in `run_dir`; returns its results."""
    if rundir.is_finished(run_dir):
        logging.info("%s is finished; not rerun", run_dir)
        return rundir.read_results(run_dir)
    # Data is read and checked before anything is written, so bad input leaves no run behind.
    splits = data.load_splits(s["dataset"], data_dir=s["data_dir"],
                              test_domains=s["test_domains"],
                              holdout_fraction=s["holdout_fraction"], seed=s["seed"],
                              skip_bad_files=s["skip_bad_files"], image_size=s["image_size"])
    stream = data.train_stream(splits, s["batch_per_domain"], seed=s["seed"])
    streams = data.eval_streams(splits, s["eval_batch_size"])
    if start_from is not None and not os.path.isfile(start_from):
        raise RunError(f"ERM model {start_from} is missing")
    os.makedirs(run_dir, exist_ok=True)
    _check_flags_file(s, run_dir)
    _set_seed(s)
    strategy = _strategy(s["strategy"])
    with strategy.scope():
        qmodel = _build(s, splits, start_from)
        quantized = s["method"] not in FLOAT_METHODS
        fq = FQATModel(qmodel, s["method"], rho=s.get("rho", 0.0), alpha=s.get("alpha", 0.0),
                       freeze_interval=s.get("freeze_interval") or 2,
                       record_signs=quantized)
        fq.compile(optimizer=keras.optimizers.Adam(s["lr"], weight_decay=s["weight_decay"] or None),
                   scale_optimizer=keras.optimizers.Adam(s["scale_lr"]) if quantized else None,
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                   jit_compile=bool(s["jit_compile"]) and not s["smoke"],
                   run_eagerly=bool(s["smoke"]))
        iterator = iter(strategy.experimental_distribute_dataset(stream)
                        if s["strategy"] != "default" else stream)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        wall = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_time_s")
    ckpt = tf.train.Checkpoint(model=fq, optimizer=fq.optimizer, iterator=iterator, step=step,
                               wall_time_s=wall)
    if fq.scale_optimizer is not None:
        ckpt.scale_optimizer = fq.scale_optimizer
    manager = tf.train.CheckpointManager(ckpt, os.path.join(run_dir, rundir.CHECKPOINTS),
                                         max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        records = _truncate(run_dir, int(step.numpy()))
        logging.info("resumed %s at step %d", run_dir, int(step.numpy()))
    else:
        records = _truncate(run_dir, -1)
        if quantized:
            calibration.calibrate_scales(qmodel, stream, s["calibration_batches"],
                                         method=s["calibration"])
            calibration.calibrate_ranges(qmodel, stream, s["calibration_batches"])
    return _loop(s, run_dir, fq, (iterator, stream), (step, wall), manager, streams, records,
                 quantized)


def _loop(s, run_dir, fq, data_in, counters, manager, streams, records, quantized):
    iterator, stream = data_in
    step, wall = counters
    started, wall_before = time.time(), float(wall.numpy())
    total = s["steps"]
    freeze_cb = DisorderFreezeCallback(interval=s.get("freeze_interval") or None,
                                       threshold=s.get("freeze_threshold") or 0.0)
    cbs = [freeze_cb] if quantized else []
    if quantized and s["quantizer"] == "ewgs" and s["ewgs_delta_mode"] == "hessian":
        cbs.append(EWGSDeltaCallback(next(iter(stream)), interval=s["ewgs_hessian_interval"],
                                     seed=s["seed"]))
    callbacks = keras.callbacks.CallbackList(cbs, model=fq)
    writer = tf.summary.create_file_writer(os.path.join(run_dir, rundir.TENSORBOARD))
    train_fn = fq.make_train_function()
    best = max((r["val_avg"] for r in records), default=-1.0)
    progbar = keras.utils.Progbar(total, verbose=s["verbose"], stateful_metrics=["frozen"])
    progbar.update(int(step.numpy()))
    callbacks.on_train_begin()
    seen_records = 0
    while int(step.numpy()) < total:
        logs = train_fn(iterator)
        step.assign_add(1)
        n = int(step.numpy())
        callbacks.on_train_batch_end(n - 1, logs)
        if len(freeze_cb.records) > seen_records:
            _append_disorder(run_dir, freeze_cb.records[seen_records:])
            seen_records = len(freeze_cb.records)
        logs = {k: float(np.asarray(v)) for k, v in logs.items()}
        progbar.update(n, values=list(logs.items()))
        if n % s["eval_every"] and n != total:
            continue
        with writer.as_default(step=n):
            for k, v in logs.items():
                tf.summary.scalar(f"train/{k}", v)
        fq.reset_metrics()
        if n > s["eval_after"] or n == total:
            record = {"step": n, **data.evaluate(fq.qmodel, streams, verbose=0)}
            rundir.append_eval(run_dir, record)
            records.append(record)
            with writer.as_default(step=n):
                for k, v in record.items():
                    if k != "step":
                        tf.summary.scalar(k, v)
            if record["val_avg"] > best:
                best = record["val_avg"]
                _save_model(fq.qmodel, run_dir)
            if s["verbose"]:
                print(f"\nstep {n}: val {record['val_avg']:.4f} test {record['test_avg']:.4f}")
        wall.assign(wall_before + time.time() - started)
        manager.save(checkpoint_number=n)
    callbacks.on_train_end()
    writer.close()
    return _finish(s, run_dir, fq, records, wall_before + time.time() - started)


def _finish(s, run_dir, fq, records, wall_time):
    chosen = data.select_best(records)
    state = fq.freeze_state
    masks = state.masks.numpy() if state.windows else []
    results = {
        "dataset": s["dataset"], "method": s["method"],
        "quantizer": None if s["method"] in FLOAT_METHODS else s["quantizer"],
        "weight_bits": None if s["method"] in FLOAT_METHODS else s["weight_bits"],
        "activation_bits": None if s["method"] in FLOAT_METHODS else s["activation_bits"],
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
        "final_masks": {n: int(m) for n, m in zip(state.scale_names, masks)},
    }
    csv_path = os.path.join(run_dir, rundir.DISORDER_CSV)
    if os.path.exists(csv_path):
        from fqat_tf import plots

        plots.plot_disorder(csv_path, os.path.join(run_dir, rundir.DISORDER_PNG))
        plots.plot_freeze_timeline(csv_path, os.path.join(run_dir, rundir.FREEZE_PNG))
    rundir.write_json(os.path.join(run_dir, rundir.RESULTS), results)
    return results
