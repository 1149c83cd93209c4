"""EWGS's Hessian-based delta (Lee et al. 2021, §3.3; docs/algorithm.md §1, `--ewgs_delta_mode`).

EWGS scales the straight-through gradient by `1 + delta * sign(g) * d`; the paper sets delta
per layer from the curvature of the loss, `delta = Tr(H)/N / G` with `G = 3 std(g)`, refreshed
during training and clipped at 0. Here `Tr(H)` is a Hutchinson estimate over each layer's
latent kernel: with the straight-through estimator the gradient with respect to the latent
weights equals the gradient with respect to their quantized values inside the clip range, so
the two Hessians agree there. Activation quantizers keep their fixed delta.
"""
import keras
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.quantizers import EWGSQuantizer
from fqat_tf.wrapper import quantize_wrappers


def hutchinson_trace(loss_fn, variables, num_samples=1, seed=None):
    """Hutchinson estimate of the Hessian trace of `loss_fn()` restricted to each variable.

    `Tr(H_i) ~= mean_z z^T H_i z` with Rademacher `z`; one Hessian-vector product per probe.

    Args:
      loss_fn: zero-argument callable returning a scalar loss that depends on `variables`.
      variables: list of variables (or tensors watched by the caller).
      num_samples: probes to average.
      seed: optional integer seed for the probes.

    Returns:
      List of scalar tensors, one trace estimate per variable.
    """
    gen = (tf.random.Generator.from_seed(seed) if seed is not None
           else tf.random.get_global_generator())
    totals = [tf.zeros([], tf.float32) for _ in variables]
    for _ in range(num_samples):
        probes = [tf.cast(2 * gen.uniform(tf.shape(v), 0, 2, dtype=tf.int32) - 1, tf.float32)
                  for v in variables]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn()
            grads = inner.gradient(loss, variables)
            dot = tf.add_n([tf.reduce_sum(g * z) for g, z in zip(grads, probes)])
        hvps = outer.gradient(dot, variables)
        totals = [t + tf.reduce_sum(z * hz) for t, z, hz in zip(totals, probes, hvps)]
    return [t / num_samples for t in totals]


def ewgs_delta_from_hessian(trace, num_elements, grad):
    """EWGS's delta `Tr(H)/N / (3 * std(g))`, clipped at 0 (Lee et al. 2021, §3.3)."""
    std = tf.math.reduce_std(tf.cast(grad, tf.float32))
    delta = tf.cast(trace, tf.float32) / float(num_elements) / (3.0 * std + 1e-12)
    return tf.maximum(delta, 0.0)


def _ewgs_wrappers(qmodel):
    return [w for w in quantize_wrappers(qmodel)
            if isinstance(w.quantize_config.weight_quantizer, EWGSQuantizer)]


def refresh_ewgs_deltas(qmodel, x, y, loss_fn=None, num_samples=defaults.EWGS_HESSIAN_SAMPLES,
                        seed=None):
    """Sets every EWGS kernel quantizer's delta from the curvature of the loss on one batch.

    Args:
      qmodel: a model from `quantize_model(..., quantizer="ewgs")`.
      x, y: one batch of inputs and integer labels.
      loss_fn: `loss_fn(y, logits) -> scalar`; default sparse categorical cross-entropy.
      num_samples: Hutchinson probes.
      seed: probe seed.

    Returns:
      dict layer name -> the delta set.
    """
    wrappers = _ewgs_wrappers(qmodel)
    if not wrappers:
        return {}
    if loss_fn is None:
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        loss_fn = ce
    kernels = [w.layer.kernel for w in wrappers]

    def loss():
        return loss_fn(y, qmodel(x, training=False))

    traces = hutchinson_trace(loss, kernels, num_samples=num_samples, seed=seed)
    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, kernels)
    deltas = {}
    for w, trace, g, k in zip(wrappers, traces, grads, kernels):
        delta = ewgs_delta_from_hessian(trace, int(tf.size(k)), g)
        w.weight_variables["delta"].assign(delta)
        deltas[w.name] = float(delta.numpy())
    return deltas


class EWGSDeltaCallback(keras.callbacks.Callback):
    """Refreshes the EWGS deltas at the start of training and every `interval` steps.

    Args:
      batch: `(x, y)` used for the curvature estimate (a fixed training batch).
      interval: steps between refreshes.
      num_samples: Hutchinson probes per refresh.
      seed: probe seed (each refresh offsets it by its step).

    Steps are counted by the model's own step counter when it has one (`FQATModel`), so a
    resumed run refreshes at the same steps, with the same probes, as an uninterrupted one.
    """

    def __init__(self, batch, interval=defaults.EWGS_HESSIAN_INTERVAL,
                 num_samples=defaults.EWGS_HESSIAN_SAMPLES, seed=0):
        super().__init__()
        if int(interval) != interval or interval < 1:
            raise ValueError(f"EWGSDeltaCallback interval must be an integer >= 1; "
                             f"got {interval!r}")
        self.x, self.y = batch[0], batch[1]
        self.interval = int(interval)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.history = []
        self._steps = 0

    def _step(self):
        state = getattr(self.model, "freeze_state", None)
        return self._steps if state is None else int(state.step.numpy())

    def _refresh(self):
        qmodel = getattr(self.model, "qmodel", self.model)
        step = self._step()
        deltas = refresh_ewgs_deltas(qmodel, self.x, self.y, num_samples=self.num_samples,
                                     seed=self.seed + step)
        self.history.append({"step": step, "delta": deltas})

    def on_train_begin(self, logs=None):
        if self._step() == 0:
            self._refresh()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._step() % self.interval == 0:
            self._refresh()
