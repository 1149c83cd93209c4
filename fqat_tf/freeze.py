"""Gradient disorder and adaptive freezing (paper Def. 4.1, §4.3, Algorithm 1; ALGORITHM.md §3).

Freezing is data, not `.trainable` flips: `FreezeState` holds one mask entry and a bounded
sign-history window per scale variable as non-trainable variables, so the compiled step reads
them and checkpoints carry them. The step records sign(g_va) into the window every step;
`DisorderFreezeCallback` turns the window into disorders and masks every K steps.
"""
import math
import os

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from fqat_tf import defaults
from fqat_tf import sagm


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


# Mask rules: (disorders, threshold r, current masks) -> new masks; 1 = g_va flows.
def fqat_rule(disorder, threshold, masks):
    """FQAT (Algorithm 1): freeze g_va where the disorder is below r, unfreeze elsewhere."""
    del masks
    return (np.asarray(disorder) >= threshold).astype(np.float32)


def reverse_rule(disorder, threshold, masks):
    """Ablation `reverse`: freeze where the disorder is above r."""
    del masks
    return (np.asarray(disorder) <= threshold).astype(np.float32)


def no_unfreeze_rule(disorder, threshold, masks):
    """Ablation `no_unfreeze`: as FQAT, but a frozen scale stays frozen to the end."""
    return (np.asarray(masks) * (np.asarray(disorder) >= threshold)).astype(np.float32)


# TensorBoard's scalar plugin metadata, written by core TF so the `tensorboard` package (which
# `tf.summary.scalar` needs) is not required.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


def _scalar(tag, value, step):
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                     metadata=_SCALAR_METADATA)


def _scatter_row(window, pos, row):
    window.scatter_nd_update(tf.reshape(pos, [1, 1]), tf.expand_dims(row, 0))


class FreezeState(keras.layers.Layer):
    """Masks, sign windows and counters of the scale variables, as non-trainable variables.

    Variables: `masks` [n] float32 (all 1 at start), `windows[i]` [K, *scale_i.shape] int8 ring
    buffers of sign(g_va), `count` (signs recorded since the window last restarted) and `step`
    (steps applied). Memory is O(K x scale elements).

    Args:
        scales: the scale variables, fixing n and the window shapes.
        window: K, the number of steps a window holds.
    """

    def __init__(self, scales, window=defaults.FREEZE_INTERVAL, name="freeze_state", **kwargs):
        super().__init__(name=name, **kwargs)
        if int(window) != window or window < 2:
            raise ValueError(f"freeze window K must be an integer >= 2; got {window!r}")
        self.window = int(window)
        self.scale_names = [getattr(s, "path", s.name) for s in scales]
        self.masks = self.add_weight(shape=(len(scales),), initializer="ones", dtype="float32",
                                     trainable=False, name="masks")
        self.windows = [
            self.add_weight(shape=(self.window,) + tuple(s.shape), initializer="zeros",
                            dtype="int8", trainable=False, name=f"signs_{i}")
            for i, s in enumerate(scales)]
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int64",
                                     trainable=False, name="count")
        self.step = self.add_weight(shape=(), initializer="zeros", dtype="int64",
                                    trainable=False, name="step")
        self.built = True

    def record(self, g_va, record_signs=True):
        """In-graph: stores sign(g_va) at the ring position and advances the counters.

        Args:
            g_va: the global first-pass scale gradients, one per scale.
            record_signs: False only advances `step`.
        """
        if record_signs and self.windows:
            pos = tf.math.floormod(tf.convert_to_tensor(self.count), self.window)
            rows = [tf.cast(tf.sign(g), tf.int8) for g in g_va]
            sagm.replica_update(self.windows, _scatter_row, [pos] * len(rows), rows)
            sagm.replica_update([self.count], lambda v, d: v.assign_add(d),
                                [tf.constant(1, tf.int64)])
        sagm.replica_update([self.step], lambda v, d: v.assign_add(d), [tf.constant(1, tf.int64)])

    def last_signs(self, length):
        """Eager: the last `length` recorded signs of every scale, oldest first."""
        count = int(self.count.numpy())
        if length > self.window or length > count:
            raise ValueError(f"asked for {length} signs; window K={self.window} holds "
                             f"{min(count, self.window)}")
        order = np.arange(count - length, count) % self.window
        return [w.numpy()[order] for w in self.windows]

    def restart_window(self):
        """Eager: forget the recorded signs (the ring is overwritten from position 0)."""
        self.count.assign(0)

    def frozen_fraction(self):
        """In-graph: the fraction of scale variables whose mask is 0."""
        if not self.windows:
            return tf.constant(0.0)
        return 1.0 - tf.reduce_mean(tf.convert_to_tensor(self.masks))


class DisorderFreezeCallback(keras.callbacks.Callback):
    """Every `interval` steps: disorder of each scale's g_va window, then the method's mask rule.

    The method's rule (fqat, freeze_both, no_unfreeze, reverse) sets the masks for the next
    `interval` steps and the window restarts. Methods without a rule (lsq_sagm, alter, ...) keep
    their masks; their disorders are still computed and logged when the model records signs.

    Logged: per scale `disorder/<scale path>` and `mask/<scale path>` appended to the History
    at every epoch end (NaN before the first window closes), `self.records` (one dict per
    window), and TensorBoard scalars under `log_dir` when given.

    Args:
        interval: K; None uses the model's `freeze_interval`. Must not exceed the window the
            model was built with.
        threshold: r.
        log_dir: TensorBoard directory, or None.
        verbose: 1 prints the frozen scales at each update.
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
        self._last_disorder = None

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
        self._interval = int(interval)
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.fspath(self.log_dir))

    def on_train_batch_end(self, batch, logs=None):
        state = self._state()
        if state.windows and int(state.count.numpy()) >= self._interval:
            self.update()

    def update(self):
        """Computes the disorders, applies the mask rule and restarts the window (eager)."""
        state = self._state()
        signs = state.last_signs(self._interval)
        disorder = np.array([gradient_disorder(s) for s in signs], dtype=np.float32)
        masks = state.masks.numpy()
        rule = self.model.method.mask_rule
        if rule is not None:
            masks = np.asarray(rule(disorder, self.threshold, masks), dtype=np.float32)
            state.masks.assign(masks)
        state.restart_window()
        step = int(state.step.numpy())
        self._last_disorder = disorder
        self.records.append({"step": step, "disorder": dict(zip(state.scale_names, disorder)),
                             "mask": dict(zip(state.scale_names, masks))})
        if self.verbose:
            frozen = [n for n, m in zip(state.scale_names, masks) if m == 0]
            print(f"\nstep {step}: {len(frozen)}/{len(masks)} scales frozen {frozen}")
        if self._writer is not None:
            with self._writer.as_default():
                for name, d, m in zip(state.scale_names, disorder, masks):
                    _scalar(f"disorder/{name}", d, step)
                    _scalar(f"mask/{name}", m, step)
                _scalar("frozen_fraction", 1.0 - float(np.mean(masks)), step)
            self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        # Written into the History directly: one key per scale in `logs` would flood the
        # progress bar.
        history = getattr(self.model, "history", None)
        state = self._state()
        if not isinstance(history, keras.callbacks.History) or not state.windows:
            return
        masks = state.masks.numpy()
        for i, name in enumerate(state.scale_names):
            d = math.nan if self._last_disorder is None else float(self._last_disorder[i])
            history.history.setdefault(f"disorder/{name}", []).append(d)
            history.history.setdefault(f"mask/{name}", []).append(float(masks[i]))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
