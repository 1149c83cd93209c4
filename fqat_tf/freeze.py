"""Gradient disorder and adaptive freezing (paper Def. 4.1, §4.3, Algorithm 1; docs/algorithm.md §3).

Freezing is data, not `.trainable` flips: `FreezeState` holds one mask entry per scale variable
and the window's sign-flip counts as non-trainable variables, so the compiled step reads them
and checkpoints carry them. The step counts the sign flips of g_va every step and, every K
steps, takes the freeze decision itself; `DisorderFreezeCallback` sets K and r and logs.
"""
import math
import os

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from fqat_tf import defaults
from fqat_tf import distribute


def gradient_disorder(signs) -> float:
    """Fraction of adjacent steps whose gradient signs differ (paper Eq. 4).

    `delta = mean over j = 1..K-1 and over elements of 1[sign(g_j) != sign(g_(j+1))]`.

    Args:
        signs: array-like of shape [K, ...]: the signs (or raw gradients; only their signs
            count) of one variable over K >= 2 consecutive steps.

    Returns:
        The disorder in [0, 1]: 0 for a constant sign, 1 for a sign flipping every step.
    """
    signs = np.sign(np.asarray(signs, dtype=np.float64))
    if signs.ndim < 1 or signs.shape[0] < 2:
        raise ValueError(f"gradient_disorder needs signs of at least 2 steps along axis 0; "
                         f"got shape {signs.shape}")
    if signs[0].size == 0:
        raise ValueError(f"gradient_disorder got a variable with no elements: {signs.shape}")
    return float(np.mean(signs[1:] != signs[:-1]))


# TensorBoard's scalar plugin metadata, written by core TF so the `tensorboard` package (which
# `tf.summary.scalar` needs) is not required.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


def _scalar(tag, value, step):
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                     metadata=_SCALAR_METADATA)


class FreezeState(keras.layers.Layer):
    """Masks and disorder bookkeeping of the scale variables, as non-trainable variables.

    The compiled step calls `record` every step with the global g_va (and g_flat); the
    disorder of each scale over the current window is counted incrementally (one previous sign
    and one flip count per element), so memory is O(scale elements) whatever K is. Once
    `configure` has set an interval K, the step itself takes the freeze decision when the
    window holds K signs (after steps K, 2K, ... of the stage): disorders, then the method's
    mask rule, then a fresh window. Decisions are therefore exact under any
    `steps_per_execution`, XLA, distribution strategy and resume (docs/algorithm.md §3).

    Variables: `masks` [n] (1 = g_va flows; all 1 at start), per scale `prev_<i>` and
    `flips_<i>` (and `flat_prev_<i>`, `flat_flips_<i>` when g_flat is tracked), `count` (signs
    in the current window), `step` (steps applied), `interval` (K; 0 = no decisions),
    `threshold` (r), `disorder` and `flat_disorder` [n] (of the last decision), `decisions`
    (decisions taken) and `decision_step` (the step of the last one).

    Args:
        scales: the scale variables, fixing n and the element shapes.
        window: the largest K `configure` accepts (the model's freeze_interval).
        track_flat: also count the disorder of g_flat (paper Fig. 3).
        rule: the method's mask rule `(disorders, r, masks) -> masks`, or None (disorders are
            still computed and logged).
    """

    def __init__(self, scales, window=defaults.FREEZE_INTERVAL, track_flat=False, rule=None,
                 name="freeze_state", **kwargs):
        super().__init__(name=name, **kwargs)
        self.rule = rule
        if int(window) != window or window < 2:
            raise ValueError(f"freeze window K must be an integer >= 2; got {window!r}")
        self.window = int(window)
        self.track_flat = bool(track_flat)
        self.scale_names = [getattr(s, "path", s.name) for s in scales]
        n = len(scales)

        def weight(name, shape, dtype="float32", init="zeros"):
            return self.add_weight(shape=shape, initializer=init, dtype=dtype, trainable=False,
                                   name=name)

        self.masks = weight("masks", (n,), init="ones")
        # One attribute per variable: TensorFlow checkpoints of Keras layers follow attributes,
        # not lists, so a list of variables would be left out of `tf.train.Checkpoint`.
        parts = ("prev", "flips") + (("flat_prev", "flat_flips") if self.track_flat else ())
        for part in parts:
            for i, s in enumerate(scales):
                setattr(self, f"{part}_{i}", weight(f"{part}_{i}", tuple(s.shape)))
        self._parts = parts
        self.count = weight("count", (), "int64")
        self.step = weight("step", (), "int64")
        self.interval = weight("interval", (), "int64")
        self.threshold = weight("threshold", (), init=keras.initializers.Constant(
            defaults.FREEZE_THRESHOLD))
        self.disorder = weight("disorder", (n,))
        self.flat_disorder = weight("flat_disorder", (n,))
        self.decisions = weight("decisions", (), "int64")
        self.decision_step = weight("decision_step", (), "int64")
        self.built = True

    def _per_scale(self, part):
        if part not in self._parts:
            return []
        return [getattr(self, f"{part}_{i}") for i in range(len(self.scale_names))]

    @property
    def prev(self):
        """Per scale: the signs of g_va at the last step (elements of the scale's shape)."""
        return self._per_scale("prev")

    @property
    def flips(self):
        """Per scale: how often each element's g_va sign flipped in the current window."""
        return self._per_scale("flips")

    @property
    def flat_prev(self):
        return self._per_scale("flat_prev")

    @property
    def flat_flips(self):
        return self._per_scale("flat_flips")

    @property
    def num_scales(self):
        return len(self.scale_names)

    def configure(self, interval, threshold):
        """Eager: take decisions every `interval` steps with threshold r from now on."""
        if int(interval) != interval or not 2 <= interval <= self.window:
            raise ValueError(f"freeze interval K={interval!r} must be an integer in "
                             f"2..{self.window} (the model's freeze_interval)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"freeze threshold r={threshold!r} must be in [0, 1]")
        self.interval.assign(int(interval))
        self.threshold.assign(float(threshold))

    @staticmethod
    def _count_flips(prev_vars, flip_vars, grads, first):
        """The new signs, and each element's flip count plus 1[sign != previous sign] (nothing
        for a window's first sign)."""
        signs = [tf.sign(tf.cast(g, tf.float32)) for g in grads]
        flips = [tf.convert_to_tensor(f) + tf.where(first, 0.0, tf.cast(tf.not_equal(s, p),
                                                                         tf.float32))
                 for f, s, p in zip(flip_vars, signs, prev_vars)]
        return signs, flips

    def record(self, g_va, record_signs=True, g_flat=None):
        """In-graph: counts sign flips of g_va (and g_flat), advances the counters and, at the
        end of a window of K signs, takes the freeze decision.

        Args:
            g_va: the global first-pass scale gradients, one per scale.
            record_signs: False only advances `step` (methods that log no disorder).
            g_flat: the global second-pass scale gradients (used when `track_flat`).
        """
        one = tf.constant(1, tf.int64)
        if not (record_signs and self.prev):
            distribute.replica_update([self.step], lambda v, d: v.assign_add(d), [one])
            return
        count = tf.convert_to_tensor(self.count)
        first = tf.equal(count, 0)
        track_flat = self.track_flat and g_flat is not None
        signs, flips = self._count_flips(self.prev, self.flips, g_va, first)
        flat_signs, flat_flips = (self._count_flips(self.flat_prev, self.flat_flips, g_flat, first)
                                  if track_flat else ([], []))
        count = count + 1
        step = tf.convert_to_tensor(self.step) + 1
        interval = tf.convert_to_tensor(self.interval)
        decide = tf.logical_and(interval > 0, count >= interval)
        pairs = tf.cast(tf.maximum(count - 1, 1), tf.float32)
        disorder = tf.stack([tf.reduce_mean(f) for f in flips]) / pairs
        masks = tf.convert_to_tensor(self.masks)
        if self.rule is not None:
            masks = tf.where(decide, self.rule(disorder, tf.convert_to_tensor(self.threshold),
                                               masks), masks)
        scalars = [self.masks, self.disorder, self.count, self.step, self.decisions,
                   self.decision_step]
        values = [masks, tf.where(decide, disorder, tf.convert_to_tensor(self.disorder)),
                  tf.where(decide, tf.zeros_like(count), count), step,
                  tf.convert_to_tensor(self.decisions) + tf.cast(decide, tf.int64),
                  tf.where(decide, step, tf.convert_to_tensor(self.decision_step))]
        flat_vars = self.flat_prev + self.flat_flips if track_flat else []
        if track_flat:
            flat = tf.stack([tf.reduce_mean(f) for f in flat_flips]) / pairs
            scalars.append(self.flat_disorder)
            values.append(tf.where(decide, flat, tf.convert_to_tensor(self.flat_disorder)))
        # A new window starts with no flips counted.
        new_flips = [tf.where(decide, tf.zeros_like(f), f) for f in flips + flat_flips]
        distribute.replica_update(
            scalars + self.prev + self.flips + flat_vars, distribute.assign,
            values + signs + new_flips[:len(flips)] + flat_signs + new_flips[len(flips):])

    def window_disorder(self):
        """Eager: the disorder of each scale's g_va over the signs recorded so far in the
        current window (NaN before two signs)."""
        count = int(self.count.numpy())
        if count < 2:
            return np.full(self.num_scales, np.nan, np.float32)
        return np.array([f.numpy().mean() / (count - 1) for f in self.flips], np.float32)

    def frozen_fraction(self):
        """In-graph: the fraction of scale variables whose mask is 0."""
        if not self.prev:
            return tf.constant(0.0)
        return 1.0 - tf.reduce_mean(tf.convert_to_tensor(self.masks))

    def decision(self):
        """Eager: the last decision as a record {"step", "disorder", "flat_disorder", "mask"}
        (dicts keyed by scale name; flat_disorder empty unless g_flat is tracked)."""
        names = self.scale_names
        return {"step": int(self.decision_step.numpy()),
                "disorder": dict(zip(names, self.disorder.numpy().tolist())),
                "flat_disorder": (dict(zip(names, self.flat_disorder.numpy().tolist()))
                                  if self.track_flat else {}),
                "mask": dict(zip(names, self.masks.numpy().tolist()))}


class DisorderFreezeCallback(keras.callbacks.Callback):
    """Sets the freeze interval K and threshold r of an `FQATModel`, and logs its decisions.

    The decisions themselves are taken inside the compiled step (`FreezeState.record`): every
    K steps the disorder of each scale's g_va over the window, then the method's mask rule
    (fqat, freeze_both, no_unfreeze, reverse), which sets the masks for the next K steps.
    Methods without a rule (lsq_sagm, alter, ...) keep their masks; their disorders are still
    computed and logged when the model records signs.

    Logged at the end of each batch in which a decision was taken: `self.records` (one dict per
    decision: step, disorder, flat_disorder, mask), per scale `disorder/<scale path>` and
    `mask/<scale path>` TensorBoard scalars under `log_dir`, and at every epoch end the same
    values appended to the History (NaN before the first decision). With
    `steps_per_execution` > K only the last decision of an execution is logged; the masks are
    exact in any case.

    Args:
        interval: K; None uses the model's `freeze_interval`. Must not exceed it.
        threshold: r.
        log_dir: TensorBoard directory, or None.
        verbose: 1 prints the frozen scales at each decision.
    """

    def __init__(self, interval=None, threshold=defaults.FREEZE_THRESHOLD, log_dir=None,
                 verbose=0):
        super().__init__()
        if interval is not None and (int(interval) != interval or interval < 2):
            raise ValueError(f"DisorderFreezeCallback interval must be an integer >= 2; "
                             f"got {interval!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"DisorderFreezeCallback threshold must be in [0, 1]; "
                             f"got {threshold!r}")
        self.interval = interval
        self.threshold = float(threshold)
        self.log_dir = log_dir
        self.verbose = verbose
        self.records = []
        self._writer = None
        self._seen = 0

    def _state(self):
        state = getattr(self.model, "freeze_state", None)
        if not isinstance(state, FreezeState):
            raise ValueError("DisorderFreezeCallback needs an fqat_tf.FQATModel; got "
                             f"{type(self.model).__name__}")
        return state

    def on_train_begin(self, logs=None):
        state = self._state()
        interval = self.interval or self.model.freeze_interval
        if interval > state.window:
            raise ValueError(f"DisorderFreezeCallback interval={interval} exceeds the model's "
                             f"freeze_interval={state.window} (the sign window size)")
        state.configure(interval, self.threshold)
        self._seen = int(state.decisions.numpy())
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.fspath(self.log_dir))

    def on_train_batch_end(self, batch, logs=None):
        state = self._state()
        decisions = int(state.decisions.numpy())
        if decisions == self._seen:
            return
        self._seen = decisions
        record = state.decision()
        self.records.append(record)
        if self.verbose:
            frozen = [n for n, m in record["mask"].items() if m == 0]
            print(f"\nstep {record['step']}: {len(frozen)}/{state.num_scales} scales frozen "
                  f"{frozen}")
        if self._writer is not None:
            self._log(record)

    def _log(self, record):
        step = record["step"]
        with self._writer.as_default():
            for name, d in record["disorder"].items():
                _scalar(f"disorder/{name}", d, step)
                _scalar(f"mask/{name}", record["mask"][name], step)
            for name, d in record["flat_disorder"].items():
                _scalar(f"flat_disorder/{name}", d, step)
            _scalar("frozen_fraction", 1.0 - float(np.mean(list(record["mask"].values()))),
                    step)
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        # Written into the History directly: one key per scale in `logs` would flood the
        # progress bar.
        history = getattr(self.model, "history", None)
        state = self._state()
        if not isinstance(history, keras.callbacks.History) or not state.prev:
            return
        last = self.records[-1] if self.records else None
        for i, name in enumerate(state.scale_names):
            d = math.nan if last is None else float(last["disorder"][name])
            history.history.setdefault(f"disorder/{name}", []).append(d)
            history.history.setdefault(f"mask/{name}", []).append(float(state.masks[i].numpy()))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
