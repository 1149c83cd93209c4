"""Scale initialisation on data: MSE range estimation (Nagel et al. 2021) or LSQ's rule.

MSE: for a tensor `v` with `m = max|v|` (per channel for per-channel steps), try the clipping
thresholds `t_i = i * m / n` (`i = 1..n`, n = 100), quantize with `s_i = t_i / u`, and keep the
threshold with the least squared error, summed over calibration batches for activations.
LSQ: `s = 2 * mean|v| / sqrt(u)`.

Activation statistics come from the float network (every quantizer bypassed), so the ranges do
not depend on the data-free initial steps (source "float", the paper's recipe). Source
"quantized" fits each input step to what the quantized network feeds that layer, the steps
before it already set: at 3 bits the float network's activations can be far wider than the
quantized network's (a deep EfficientNet's steps then exceed its inputs' whole range and the
signal dies), so the steps of a narrow model are best fitted in order.
"""
import keras
import numpy as np
import tensorflow as tf

from fqat_tf import defaults, int8_storage, layer_types, quant_ops, storage
from fqat_tf.wrapper import QuantizeWrapper, quantize_wrappers

METHODS = ("mse", "lsq")
SOURCES = ("float", "quantized")


@tf.function(reduce_retracing=True)
def _candidate_errors(v, max_abs, lo, hi, num_candidates, per_channel):
    """Squared quantization error of every candidate threshold; `[n]` or `[n, C]`."""
    axes = tf.range(tf.rank(v) - 1) if per_channel else tf.range(tf.rank(v))

    def err(i):
        s = tf.maximum(tf.cast(i, tf.float32) * max_abs / tf.cast(num_candidates, tf.float32) / hi,
                       defaults.STEP_FLOOR)
        q = quant_ops.grid_quantize(v, s, lo, hi)
        return tf.reduce_sum(tf.square(v - q), axis=axes)

    return tf.map_fn(err, tf.range(1, num_candidates + 1), fn_output_signature=tf.float32)


def _max_abs(v, per_channel):
    v = tf.abs(v)
    return tf.reduce_max(v, axis=tf.range(tf.rank(v) - 1)) if per_channel else tf.reduce_max(v)


def quantization_mse(values, step, num_bits, signed):
    """Mean squared error of quantizing `values` with `step` (numpy; for reports and tests)."""
    lo, hi = quant_ops.quant_range(num_bits, signed)
    values = np.asarray(values, np.float64)
    q = quant_ops.grid_quantize(values, step, lo, hi)
    return float(np.mean((values - q) ** 2))


def _step_from_errors(errors, max_abs, hi, num_candidates):
    best = tf.argmin(errors, axis=0)
    step = tf.cast(best + 1, tf.float32) * max_abs / num_candidates / hi
    return np.maximum(step.numpy(), defaults.STEP_FLOOR).astype("float32")


def _fit_steps(stream, quantizers, method, num_candidates):
    """Steps for several tensors observed over a re-iterable stream of batches.

    Args:
      stream: zero-argument callable returning an iterator; each item is a list with one tensor
        per quantizer. MSE walks it twice (max, then errors), so memory holds one batch at a time.
      quantizers: one `Quantizer` per tensor.
      method: "mse" or "lsq".
      num_candidates: MSE grid size.

    Returns:
      List of float32 steps (scalars or `[C]` arrays).
    """
    n = len(quantizers)
    if method == "lsq":
        sums, counts = [0.0] * n, [0] * n
        for tensors in stream():
            for i, (t, q) in enumerate(zip(tensors, quantizers)):
                a = np.abs(np.asarray(t, np.float64))
                if q.per_channel:
                    a = a.reshape(-1, a.shape[-1])
                    sums[i], counts[i] = sums[i] + a.sum(0), counts[i] + a.shape[0]
                else:
                    sums[i], counts[i] = sums[i] + a.sum(), counts[i] + a.size
        return [np.maximum(2.0 * (np.asarray(s) / c) / np.sqrt(q.qrange[1]),
                           defaults.STEP_FLOOR).astype("float32")
                for s, c, q in zip(sums, counts, quantizers)]
    maxes = [None] * n
    for tensors in stream():
        for i, (t, q) in enumerate(zip(tensors, quantizers)):
            m = _max_abs(tf.convert_to_tensor(t, tf.float32), q.per_channel)
            maxes[i] = m if maxes[i] is None else tf.maximum(maxes[i], m)
    maxes = [tf.maximum(m, defaults.STEP_FLOOR) for m in maxes]
    errors = [0.0] * n
    for tensors in stream():
        for i, (t, q) in enumerate(zip(tensors, quantizers)):
            lo, hi = q.qrange
            errors[i] += _candidate_errors(
                tf.convert_to_tensor(t, tf.float32), maxes[i], tf.constant(lo), tf.constant(hi),
                tf.constant(num_candidates), tf.constant(q.per_channel))
    return [_step_from_errors(e, m, q.qrange[1], num_candidates)
            for e, m, q in zip(errors, maxes, quantizers)]


def mse_step(batches, quantizer, num_candidates=defaults.CALIBRATION_CANDIDATES):
    """MSE-optimal step for a list of tensors (batches) quantized by `quantizer`.

    Returns:
      The step, a float32 numpy scalar or `[C]` array.
    """
    return _fit_steps(lambda: ([b] for b in batches), [quantizer], "mse", num_candidates)[0]


def _float_probe(qmodel):
    """A model sharing qmodel's float layers that outputs the input of every quantized layer."""
    qmodel = layer_types.functional_view(qmodel, "calibrate_scales")
    taps = {}

    def call(layer, *args, **kwargs):
        if isinstance(layer, QuantizeWrapper):
            if layer.quantize_config.input_quantizer is not None:
                taps[layer.name] = args[0]
            y = layer.layer(args[0])
            return y if layer.batchnorm is None else layer.batchnorm(y, training=False)
        return layer(*args, **kwargs)

    float_model = keras.models.clone_model(qmodel, clone_function=lambda l: l, call_function=call)
    names = list(taps)
    return keras.Model(float_model.inputs, [taps[n] for n in names]), names


class _FitInputStep(keras.layers.Layer):
    """Calls a `QuantizeWrapper` after fitting its input step to the input it receives (when
    run eagerly: `_fit_in_order`)."""

    def __init__(self, wrapper, fit, **kwargs):
        super().__init__(name=f"fit_{wrapper.name}", **kwargs)
        self.wrapper = wrapper
        self.fit = fit

    def call(self, inputs, *args, **kwargs):
        if tf.executing_eagerly():
            self.fit(self.wrapper, inputs)
        return self.wrapper(inputs, *args, **kwargs)


def _fit_in_order(qmodel, batches, method, num_candidates):
    """Input steps fitted in the order the quantized model computes its layers: each to its
    input in the quantized model, every step before it already set. One eager pass over the
    calibration batches as one batch (memory: all of them at once); the squared errors are
    summed over the batches as for source "float".

    Returns:
      `{layer name: step}` in that order.
    """
    qmodel = layer_types.functional_view(qmodel, "calibrate_scales")
    sizes = [int(b.shape[0]) for b in batches]
    steps = {}

    def fit(wrapper, x):
        if wrapper.name in steps:  # a shared layer: its first call decides
            return
        parts = tf.split(tf.cast(x, tf.float32), sizes)
        step = _fit_steps(lambda: ([p] for p in parts), [wrapper.quantize_config.input_quantizer],
                          method, num_candidates)[0]
        wrapper.input_variables["step"].assign(step)
        steps[wrapper.name] = step

    def call(layer, *args, **kwargs):
        if isinstance(layer, QuantizeWrapper) and layer.quantize_config.input_quantizer is not None:
            return _FitInputStep(layer, fit)(*args, **kwargs)
        return layer(*args, **kwargs)

    fitting = keras.models.clone_model(qmodel, clone_function=lambda l: l, call_function=call)
    fitting(tf.concat(batches, 0), training=False)
    return steps


def _inputs_only(element):
    return element[0] if isinstance(element, (tuple, list)) else element


def _take(dataset, num_batches, caller):
    """The input batches of the first `num_batches` elements of `dataset`, as tensors."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    batches = []
    for element in dataset:
        batches.append(tf.convert_to_tensor(_inputs_only(element)))
        if len(batches) >= num_batches:
            break
    if not batches:
        raise ValueError(f"{caller}: the calibration dataset is empty")
    return batches


def calibrate_ranges(model, dataset, num_batches=defaults.CALIBRATION_BATCHES):
    """Sets every int8 storage range of `model` (`fqat_tf.int8_storage`) to the extremes seen on
    `num_batches` batches of `dataset`.

    Runs the model eagerly in inference mode; the ranges of later layers see the earlier ones
    already quantized, as in training. Then gives the layers that read their input as stored
    the scale of that input (`fqat_tf.storage.sync_input_scales`). Returns
    `{layer name: {part: (min, max)}}` (empty for a model without int8 storage).
    """
    layers = int8_storage.storage_layers(model)
    batches = _take(dataset, num_batches, "calibrate_ranges")
    for layer in layers:
        layer.initialized.assign(0.0)
        layer.calibrating = True
    try:
        if layers:
            for b in batches:
                model(b, training=False)
    finally:
        for layer in layers:
            layer.calibrating = False
    if any(w.reads_stored_input for w in quantize_wrappers(model)):
        storage.sync_input_scales(model)
    return {layer.name: layer.stored_ranges for layer in layers}


def calibrate_scales(qmodel, dataset, num_batches=defaults.CALIBRATION_BATCHES,
                     method=defaults.CALIBRATION, num_candidates=defaults.CALIBRATION_CANDIDATES,
                     source=defaults.CALIBRATION_SOURCE):
    """Sets every kernel and input step of `qmodel` from data.

    Args:
      qmodel: a model returned by `quantize_model`.
      dataset: iterable of input batches or `(inputs, labels, ...)` tuples.
      num_batches: calibration batches taken from `dataset` for activation ranges.
      method: "mse" (default) or "lsq".
      num_candidates: MSE grid size.
      source: "float" (default): input steps from the float network's activations, every
        quantizer bypassed; "quantized": each from the quantized network's input to its layer,
        fitted in order (see the module docstring).

    Returns:
      dict layer name -> {"kernel": step, "input": step} of the values set.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if source not in SOURCES:
        raise ValueError(f"calibration source must be one of {SOURCES}, got {source!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    wrappers = {w.name: w for w in quantize_wrappers(qmodel)}
    result = {name: {} for name in wrappers}
    weighted = [w for w in wrappers.values() if w.quantize_config.weight_quantizer is not None]
    steps = [_fit_steps(lambda w=w: iter([[w.kernel_view()]]),
                        [w.quantize_config.weight_quantizer], method, num_candidates)[0]
             for w in weighted]
    for w, step in zip(weighted, steps):
        w.weight_variables["step"].assign(step)
        result[w.name]["kernel"] = step
    batches = _take(dataset, num_batches, "calibrate_scales")
    if source == "quantized":
        for name, step in _fit_in_order(qmodel, batches, method, num_candidates).items():
            result[name]["input"] = step
        return result
    probe, names = _float_probe(qmodel)
    if not names:
        return result

    def stream():
        for b in batches:
            taps = probe(b, training=False)
            yield list(taps) if isinstance(taps, (list, tuple)) else [taps]

    steps = _fit_steps(stream, [wrappers[n].quantize_config.input_quantizer for n in names],
                       method, num_candidates)
    for name, step in zip(names, steps):
        wrappers[name].input_variables["step"].assign(step)
        result[name]["input"] = step
    return result
