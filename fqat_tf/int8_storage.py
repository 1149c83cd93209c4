"""Integer storage in training: the tensors an int8 model stores in 8 bits, fake-quantized so.

The paper's recipe quantizes the inputs and kernels of the inner convolutions only. An integer
model (TFLite, `export/`) must also store in int8 what that recipe keeps float: the first
conv's and the classifier's kernels, and every tensor that is not read by a learned quantizer
alone (a residual branch before its sum, a block output also read by the identity shortcut,
the pooled features, the logits, GroupNorm's statistics). At 3 and 4 bits a model is sensitive
enough that this storage alone changes several percent of its predictions. Training with the
storage simulated (as tfmot's 8-bit scheme does for every tensor) makes the Keras model the
integer model up to rounding ties: `fqat_tf.storage.int8_storage_model` inserts the layers of
this module where the model's `fqat_tf.storage.StoragePlan` stores a tensor on a range of its
own.

* `RangeQuantize`: 8-bit fake quantization on a `[min, max]` range, the moving average of the
  batch extremes in training (tfmot's `MovingAverageQuantizer`), fixed at inference; set first
  from data by `fqat_tf.calibrate_ranges`. An uncalibrated layer is the identity.
* `Int8GroupNormalization`: GroupNorm computed as the exporter lowers it to int8 ops
  (`group_norm_ops`), each intermediate tensor on its own moving range.
* `int8_kernel`, `on_grid`: a float kernel on its symmetric per-channel (per-tensor for Dense)
  int8 grid, and a bias on TFLite's int32 grid (input step times kernel scale):
  `QuantizeWrapper(int8_storage=True)`.

Ranges are whole (`effective_range`): they contain 0 and are at least `MIN_RANGE` wide, and are
nudged and rounded as the integer model does (`range_quantize`).
"""
import keras
import numpy as np
import tensorflow as tf

from fqat_tf import defaults, int8_kernels

INT8_WEIGHT_MAX = 127          # TFLite's int8 weights: symmetric, in [-127, 127]
MIN_WEIGHT_SCALE = 1e-12       # an all-zero channel still gets a positive scale
MIN_RANGE = 1e-6
# How far from an integer (in its own steps) a stored value may be and still count as on its
# grid: float32's error on `k * scale / scale` is under 1e-4 for |k| <= 255.
ON_GRID_TOLERANCE = 1e-3
GROUP_NORM_PARTS = ("mean", "centred", "sum_squares", "sum_squares_eps", "rsqrt", "scale",
                    "mean_scaled", "offset", "scaled")


def effective_range(lo, hi):
    """The range an 8-bit fake quant of recorded extremes `(lo, hi)` uses (numpy or tensors)."""
    if isinstance(lo, (float, int, np.floating, np.ndarray)):
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        return lo, max(hi, lo + MIN_RANGE)
    lo, hi = tf.minimum(lo, 0.0), tf.maximum(hi, 0.0)
    return lo, tf.maximum(hi, lo + MIN_RANGE)


def range_quantize(x, lo, hi):
    """`x` on the int8 grid of the FakeQuant range `[lo, hi]`, as the integer model stores it.

    The grid is the converter's (`int8_kernels.quantization_params`: the range nudged so that
    0 is on it), and `x` is rounded relative to 0, half to even, as XNNPACK requantizes
    (`round(x / scale) + zero_point`). `tf.quantization.fake_quant_with_min_max_vars` rounds
    `x - min` instead, which keeps fewer bits the farther `x` is from the range's minimum:
    values up to about 4e-5 of a step from a rounding boundary round the other way than
    `x / scale` does. Rounded relative to 0, the float32 error shrinks with `|x|`, as that of
    the integer kernel's own float32 requantization does (docs/algorithm.md §5). The gradient
    is FakeQuant's: 1 inside the nudged range, 0 outside.

    Args:
      x: a tensor (computed in float32, returned in its dtype).
      lo, hi: float32 scalars, the effective range (`effective_range`).
    """
    scale, zero = int8_kernels.quantization_params(lo, hi)
    x32 = tf.cast(x, tf.float32)
    y = int8_kernels.from_int8(int8_kernels.to_int8(x32, scale, zero), scale, zero)
    low = int8_kernels.from_int8(int8_kernels.INT8_MIN, scale, zero)
    high = int8_kernels.from_int8(int8_kernels.INT8_MAX, scale, zero)
    inside = tf.logical_and(x32 >= low, x32 <= high)
    return tf.cast(tf.where(inside, x32 + tf.stop_gradient(y - x32), tf.stop_gradient(y)),
                   x.dtype)


def abs_max_scales(values, per_channel=True):
    """Symmetric int8 scales `max|v| / 127`, never below `MIN_WEIGHT_SCALE` (TFLite's weights).

    Args:
      values: numpy array or tensor, channels on the last axis (a kernel as its quantizer sees
        it: `QuantizeWrapper.kernel_view`).
      per_channel: one scale per channel (`[C]`), or one for the whole tensor (a scalar).

    Returns:
      float64 numpy for numpy `values`, else a tensor of `values`' dtype.
    """
    if isinstance(values, np.ndarray):
        a = np.abs(values.astype(np.float64))
        m = a.reshape(-1, a.shape[-1]).max(axis=0) if per_channel else a.max(initial=0.0)
        return np.maximum(m, MIN_WEIGHT_SCALE) / INT8_WEIGHT_MAX
    a = tf.abs(tf.convert_to_tensor(values))
    m = tf.reduce_max(a, axis=list(range(len(a.shape) - 1))) if per_channel else tf.reduce_max(a)
    # Divided in float64: a graph multiplies by the reciprocal of a constant divisor instead
    # (grappler's constant folding), which float32 rounds differently from the division of
    # an eager call.
    scales = tf.maximum(tf.cast(m, tf.float64), MIN_WEIGHT_SCALE) / INT8_WEIGHT_MAX
    return tf.cast(scales, a.dtype)


def int8_kernel(kernel, per_channel=True):
    """`kernel` (channels last) rounded onto its int8 grid; the gradient passes straight
    through."""
    s = tf.stop_gradient(abs_max_scales(kernel, per_channel))
    q = tf.round(kernel / s) * s
    return kernel + tf.stop_gradient(q - kernel)


def scale_product(*factors):
    """The product of scale tensors (None skipped) in float64. A graph rewrite may reorder a
    chain of products (grappler's arithmetic optimizer does), which moves a float32 product's
    last bit; rounded once to float32, the float64 product keeps the eager call's value."""
    product = None
    for factor in factors:
        if factor is not None:
            factor = tf.cast(factor, tf.float64)
            product = factor if product is None else product * factor
    return product


def on_grid(values, step):
    """`values` rounded to multiples of `step` (a bias on its int32 grid); straight-through."""
    step = tf.stop_gradient(tf.cast(step, values.dtype))
    return values + tf.stop_gradient(tf.round(values / step) * step - values)


class _Range:
    """The `(min, max)` variables of one tensor and their update rule."""

    def __init__(self, layer, name):
        make = lambda suffix: layer.add_weight(shape=(), initializer="zeros", trainable=False,
                                               autocast=False, aggregation="mean",
                                               name=f"{name}_{suffix}")
        self.name = name
        self.min, self.max = make("min"), make("max")

    def update(self, x, mode, initialized, decay):
        """Records the extremes of `x`: "calibrate" widens, "train" takes the moving average.

        Infinite values (`saturating_rsqrt` of 0) are left out: the quantizer saturates them.
        """
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        x = tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))
        lo, hi = tf.reduce_min(x), tf.reduce_max(x)
        if mode == "calibrate":
            lo = tf.where(initialized, tf.minimum(self.min, lo), lo)
            hi = tf.where(initialized, tf.maximum(self.max, hi), hi)
        else:
            lo = tf.where(initialized, decay * self.min + (1.0 - decay) * lo, lo)
            hi = tf.where(initialized, decay * self.max + (1.0 - decay) * hi, hi)
        self.min.assign(lo)
        self.max.assign(hi)

    def quantize(self, x, initialized):
        lo, hi = effective_range(tf.convert_to_tensor(self.min), tf.convert_to_tensor(self.max))
        x32 = tf.cast(x, tf.float32)
        q = range_quantize(x32, tf.stop_gradient(lo), tf.stop_gradient(hi))
        return tf.cast(tf.where(initialized, q, x32), x.dtype)

    def numpy(self):
        return effective_range(float(keras.ops.convert_to_numpy(self.min)),
                               float(keras.ops.convert_to_numpy(self.max)))


class StorageLayerMixin:
    """Range variables, the `initialized` flag and the calibration switch of a storage layer
    (`storage_layers` finds the layers that have them)."""

    def _set_decay(self, ema_decay):
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"{type(self).__name__}: ema_decay must be in [0, 1), "
                             f"got {ema_decay!r}")
        self.ema_decay = float(ema_decay)

    def _build_ranges(self, names):
        self._ranges = {n: _Range(self, n) for n in names}
        # Under a distribution strategy each replica updates the ranges from its own part of
        # the batch; "mean" keeps the replicas' copies equal (the mean of their updates).
        self.initialized = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                           autocast=False, aggregation="mean",
                                           name="initialized")
        self.calibrating = False

    def _mode(self, training):
        if self.calibrating:
            return "calibrate"
        return "train" if training else None

    def _observe(self, name, x, mode):
        """Updates range `name` from `x` in calibration or training; returns whether the
        range is in use (calibrated, or updated just now) as a boolean tensor."""
        initialized = tf.convert_to_tensor(self.initialized) > 0
        if mode is None:
            return initialized
        self._ranges[name].update(x, mode, initialized, self.ema_decay)
        return tf.constant(True)

    def _quantize(self, name, x, mode):
        return self._ranges[name].quantize(x, self._observe(name, x, mode))

    def _range(self, name):
        """The effective `(min, max)` of range `name`, as tensors."""
        rng = self._ranges[name]
        return effective_range(tf.convert_to_tensor(rng.min), tf.convert_to_tensor(rng.max))

    def _mark_initialized(self, mode):
        if mode is not None:
            self.initialized.assign(1.0)

    @property
    def stored_ranges(self):
        """`{part: (min, max)}` effective ranges, or `{}` while uncalibrated."""
        if float(keras.ops.convert_to_numpy(self.initialized)) <= 0:
            return {}
        return {n: r.numpy() for n, r in self._ranges.items()}


@keras.saving.register_keras_serializable(package="fqat_tf")
class RangeQuantize(StorageLayerMixin, keras.layers.Layer):
    """8-bit fake quantization of its input on a moving-average `[min, max]` range.

    Args:
      ema_decay: decay of the moving average of the batch extremes in training.
    """

    def __init__(self, ema_decay=defaults.INT8_RANGE_EMA_DECAY, **kwargs):
        super().__init__(**kwargs)
        self._set_decay(ema_decay)

    def build(self, input_shape):
        self._build_ranges(["output"])
        self.built = True

    def call(self, inputs, training=None):
        mode = self._mode(training)
        y = self._quantize("output", inputs, mode)
        self._mark_initialized(mode)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    @property
    def range(self):
        """The effective `(min, max)`, or None while uncalibrated."""
        return self.stored_ranges.get("output")

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay}


@tf.custom_gradient
def saturating_rsqrt(x):
    """`rsqrt(x)`, infinite at 0 as in TFLite's int8 RSQRT (which saturates there), with a zero
    gradient at 0 so the zero gradient of the saturated quantizer behind it stays finite."""
    positive = x > 0

    def grad(dy):
        safe = tf.where(positive, x, tf.ones_like(x))
        return tf.where(positive, dy * -0.5 * tf.math.rsqrt(safe) / safe, tf.zeros_like(x))

    return tf.math.rsqrt(x), grad


def group_norm_ops(x, groups, epsilon, gamma, beta, fq_range, fq_constant, scaled_clip=None,
                   rsqrt=tf.math.rsqrt):
    """GroupNorm over the channel axis of an NHWC tensor, from ops with int8 TFLite kernels.

    `y = x * a + (beta - mean * a)` with `a = gamma * rsqrt(var + eps)` per example and group.
    This form rounds the output once from `x * a` and once from the per-group offset: where x
    is 0 (most of a ReLU map) y is the offset alone, so the many equal values of a group do
    not carry a shared rounding error of the centred tensor into the reader's quantizer. The
    centred tensor feeds the variance only: the sum of squares is one BATCH_MATMUL of the
    centred group with itself, accumulated in int32 (a squared tensor would need its own int8
    range, which its largest values fill). `1/n` joins the constant side:
    `rsqrt(var + eps) = sqrt(n) * rsqrt(sum_sq + n * eps)`.

    Args:
      x: `[batch, h, w, c]` with static `h, w, c`.
      groups, epsilon: the GroupNorm's.
      gamma, beta: `[c]` numpy arrays or tensors, or None.
      fq_range: `fq_range(part, tensor, clip=None)`, the 8-bit storage of the intermediate
        tensor `part` (one of `GROUP_NORM_PARTS`).
      fq_constant: `fq_constant(values)`, the 8-bit storage of a constant operand.
      scaled_clip: `(lo, hi)` or None, passed to `fq_range` for "scaled" (a range observer may
        bound it where the reader clips the output).
      rsqrt: the reciprocal square root (training passes `saturating_rsqrt`: the sum of
        squares of a constant group can round to 0).

    Returns:
      The normalised tensor, shaped as `x`.
    """
    h, w, c = (int(d) for d in x.shape[1:])
    g = int(groups)
    k = c // g
    n = h * w * k

    def shaped(v, default):
        v = default if v is None else v
        if isinstance(v, np.ndarray):
            return v.reshape(1, 1, g, k)
        return tf.reshape(tf.cast(v, tf.float32), [1, 1, g, k])

    xr = tf.reshape(x, [-1, h * w, g, k])
    mean = fq_range("mean", tf.reduce_mean(xr, axis=[1, 3], keepdims=True))
    centred = fq_range("centred", xr - mean)
    rows = tf.reshape(tf.transpose(centred, [0, 2, 1, 3]), [-1, g, 1, h * w * k])
    sum_sq = fq_range("sum_squares", tf.matmul(rows, rows, transpose_b=True))
    sum_sq = fq_range("sum_squares_eps", sum_sq + fq_constant(np.array(n * float(epsilon))))
    inv = tf.reshape(fq_range("rsqrt", rsqrt(sum_sq)), [-1, 1, g, 1])
    a = fq_range("scale", inv * fq_constant(shaped(gamma, np.ones(c)) * np.sqrt(n)))
    offset = fq_range("offset", fq_constant(shaped(beta, np.zeros(c)))
                      - fq_range("mean_scaled", mean * a))
    clip = None
    if scaled_clip is not None:
        lo, hi = scaled_clip
        clip = (lo - tf.reduce_max(offset), hi - tf.reduce_min(offset))
    y = fq_range("scaled", xr * a, clip=clip) + offset
    return tf.reshape(y, [-1, h, w, c])


def fake_quant_constant(values):
    """A constant operand on the 8-bit grid of its own range (`[min, max]` widened to 0)."""
    c = tf.cast(tf.convert_to_tensor(values), tf.float32)
    lo, hi = effective_range(tf.reduce_min(c), tf.reduce_max(c))
    return tf.quantization.fake_quant_with_min_max_vars(c, tf.stop_gradient(lo),
                                                        tf.stop_gradient(hi), num_bits=8)


@keras.saving.register_keras_serializable(package="fqat_tf")
class Int8GroupNormalization(StorageLayerMixin, keras.layers.GroupNormalization):
    """GroupNormalization (channels last, 4-D input) with its int8 lowering simulated.

    Same arguments and variables as `keras.layers.GroupNormalization`, plus `ema_decay`.
    """

    def __init__(self, ema_decay=defaults.INT8_RANGE_EMA_DECAY, **kwargs):
        super().__init__(**kwargs)
        self._set_decay(ema_decay)

    def build(self, input_shape):
        if len(input_shape) != 4 or self.axis not in (-1, 3) or None in input_shape[1:]:
            raise ValueError(f"Int8GroupNormalization {self.name!r}: needs a channels-last 4-D "
                             f"input of known spatial size, got {input_shape} axis={self.axis}")
        super().build(input_shape)
        self._build_ranges(GROUP_NORM_PARTS)

    def call(self, inputs, training=None):
        mode = self._mode(training)
        initialized = tf.convert_to_tensor(self.initialized) > 0
        active = tf.logical_or(initialized, mode is not None)

        def constant(values):
            c = tf.cast(tf.convert_to_tensor(values), tf.float32)
            return tf.where(active, fake_quant_constant(c), c)

        y = group_norm_ops(tf.cast(inputs, tf.float32), self.groups, self.epsilon,
                           self.gamma if self.scale else None, self.beta if self.center else None,
                           lambda part, t, clip=None: self._quantize(part, t, mode), constant,
                           rsqrt=saturating_rsqrt)
        self._mark_initialized(mode)
        return tf.cast(y, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay}


def storage_layers(model):
    """The `RangeQuantize` and `Int8GroupNormalization` layers of `model` (nested included)."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, StorageLayerMixin)]
