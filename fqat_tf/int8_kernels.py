"""TFLite's int8 activation kernels, computed in TensorFlow ops (docs/algorithm.md §5).

An int8 storage layer (`fqat_tf.int8_activations`) and the exporter's observe mode run an
activation through these functions, so that the Keras model computes exactly the integers the
TFLite kernel computes. LOGISTIC, TANH and SOFTMAX evaluate the float function on the int8
input and round onto the fixed output grid (XNNPACK's and the built-in kernels' tables);
HARD_SWISH is TFLite's 16-bit fixed-point arithmetic (`reference_ops::HardSwish`), tabulated
for the 256 int8 inputs; hard-sigmoid is the depthwise multiply-add it is lowered to.

Scales and zero points are those the converter stores for a FakeQuant range: the range nudged
so that 0 is on the grid, in double precision, the scale then kept as float32
(`quantization_params`).
"""
import numpy as np
import tensorflow as tf

INT8_MIN, INT8_MAX = -128, 127
_INT16_MIN, _INT16_MAX = -(1 << 15), (1 << 15) - 1


def _round_half_away(x):
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def range_scale(lo, hi):
    """The scale of FakeQuant `[lo, hi]` (float32 ends) in the converter's double precision."""
    lo = tf.cast(tf.convert_to_tensor(lo, tf.float32), tf.float64)
    hi = tf.cast(tf.convert_to_tensor(hi, tf.float32), tf.float64)
    return (hi - lo) / 255.0


def quantization_params(lo, hi):
    """`(scale, zero_point)` of the int8 tensor the converter makes of FakeQuant `[lo, hi]`.

    `lo`, `hi`: float32 scalars (tensors or numbers). Returns a float32 scale and an int32 zero
    point, as tensors. The zero point comes from whichever end adds the smaller rounding error
    and is rounded half away from zero, as the converter's `getNudgedScaleAndZeroPoint` does.
    """
    scale = range_scale(lo, hi)
    lo = tf.cast(tf.convert_to_tensor(lo, tf.float32), tf.float64)
    hi = tf.cast(tf.convert_to_tensor(hi, tf.float32), tf.float64)
    from_min, from_max = INT8_MIN - lo / scale, INT8_MAX - hi / scale
    use_min = INT8_MIN + tf.abs(lo / scale) <= INT8_MAX + tf.abs(hi / scale)
    zero = _round_half_away(tf.where(use_min, from_min, from_max))
    zero = tf.clip_by_value(zero, INT8_MIN, INT8_MAX)
    return tf.cast(scale, tf.float32), tf.cast(zero, tf.int32)


def bias_on_grid(bias, input_scale, weight_scales):
    """`bias` as the converter stores it: the int32 `round(bias / (input_scale *
    weight_scale))`, in double precision and rounded half away from zero, times that scale
    (which the kernel then applies in float32). The gradient passes straight through.

    Args:
      bias: float32 tensor, `[channels]`.
      input_scale: the input's scale in double precision (`range_scale`).
      weight_scales: float32 per-channel weight scales, `[channels]`.
    """
    grid = tf.cast(input_scale, tf.float64) * tf.cast(weight_scales, tf.float64)
    ints = _round_half_away(tf.cast(bias, tf.float64) / grid)
    runtime = tf.cast(tf.cast(input_scale, tf.float32), tf.float64) * tf.cast(
        weight_scales, tf.float64)
    value = tf.cast(ints * runtime, tf.float32)
    return bias + tf.stop_gradient(value - bias)


def to_int8(x, scale, zero):
    """The int8 integers (as int32) of values `x` that lie on the grid of `(scale, zero)`."""
    q = tf.round(tf.cast(x, tf.float32) / scale) + tf.cast(zero, tf.float32)
    return tf.cast(tf.clip_by_value(q, INT8_MIN, INT8_MAX), tf.int32)


def from_int8(q, scale, zero):
    """The real values of int8 integers `q`."""
    return tf.cast(q - zero, tf.float32) * scale


def quantize(x, scale, zero):
    """`x` rounded onto the int8 grid of `(scale, zero)` and saturated; the gradient passes
    straight through."""
    x = tf.cast(x, tf.float32)
    return x + tf.stop_gradient(from_int8(to_int8(x, scale, zero), scale, zero) - x)


def on_range(y, output_range):
    """`y` on the int8 grid of the FakeQuant range `output_range` (a fixed output grid)."""
    return quantize(y, *quantization_params(*output_range))


# --- HARD_SWISH: gemmlowp's 16-bit fixed point, as TFLite's reference kernel runs it ------------
def _quantize_multiplier(m):
    """TFLite's `QuantizeMultiplier` of a positive float64 tensor: `(int64 q31, exponent)`."""
    exponent = tf.floor(tf.math.log(m) / np.log(2.0)) + 1.0
    q = m / tf.pow(tf.constant(2.0, tf.float64), exponent)
    # log2 can be off by one in float: bring q into [0.5, 1).
    exponent = tf.where(q >= 1.0, exponent + 1.0, tf.where(q < 0.5, exponent - 1.0, exponent))
    q = m / tf.pow(tf.constant(2.0, tf.float64), exponent)
    fixed = tf.cast(tf.floor(q * 2.0 ** 31 + 0.5), tf.int64)
    exponent = tf.cast(exponent, tf.int64)
    overflow = fixed == (1 << 31)
    return (tf.where(overflow, fixed // 2, fixed), tf.where(overflow, exponent + 1, exponent))


def _int16_multiplier(m):
    """`QuantizeMultiplier` then `DownScaleInt32ToInt16Multiplier`: `(int64 q15, exponent)`."""
    fixed, exponent = _quantize_multiplier(m)
    offset = 1 << 15
    q15 = tf.where(fixed >= (1 << 31) - 1 - offset, tf.constant(_INT16_MAX, tf.int64),
                   tf.bitwise.right_shift(fixed + offset, 16))
    return q15, exponent


def _trunc_div(a, d):
    """C's integer division (towards zero) of int64 `a` by a positive power of two `d`."""
    return tf.sign(a) * (tf.abs(a) // d)


def _srdhm(a, b):
    """gemmlowp's `SaturatingRoundingDoublingHighMul` on int16 values held in int64."""
    ab = a * b
    nudge = tf.where(ab >= 0, tf.constant(1 << 14, tf.int64), tf.constant(1 - (1 << 14), tf.int64))
    out = _trunc_div(ab + nudge, 1 << 15)
    return tf.where((a == b) & (a == _INT16_MIN), tf.constant(_INT16_MAX, tf.int64), out)


def _sdhm(a, b):
    """TFLite's `SaturatingDoublingHighMul` (no rounding) on int16 values held in int64."""
    out = _trunc_div(a * b, 1 << 15)
    return tf.where((a == b) & (a == _INT16_MIN), tf.constant(_INT16_MAX, tf.int64), out)


def _rounding_divide_by_pot(x, exponent):
    """gemmlowp's `RoundingDivideByPOT` (round half away from zero) for int64 `x`."""
    mask = tf.bitwise.left_shift(tf.constant(1, tf.int64), exponent) - 1
    remainder = tf.bitwise.bitwise_and(x, mask)
    threshold = tf.bitwise.right_shift(mask, 1) + tf.cast(x < 0, tf.int64)
    return tf.bitwise.right_shift(x, exponent) + tf.cast(remainder > threshold, tf.int64)


def _saturating_left_shift(x, amount):
    return tf.clip_by_value(x * tf.bitwise.left_shift(tf.constant(1, tf.int64), amount),
                            _INT16_MIN, _INT16_MAX)


def hard_swish_table(in_scale, in_zero, out_scale, out_zero):
    """The int8 output of TFLite's HARD_SWISH for each int8 input -128..127 (int32 `[256]`)."""
    hires_scale = in_scale * (1.0 / 128.0)                       # float32, as TFLite's Prepare
    out_m, out_exp = _int16_multiplier(tf.cast(hires_scale / out_scale, tf.float64))
    relu_m, relu_exp = _int16_multiplier(
        tf.cast(hires_scale / tf.constant(3.0 / 32768.0, tf.float32), tf.float64))
    value = tf.range(INT8_MIN, INT8_MAX + 1, dtype=tf.int64) - tf.cast(in_zero, tf.int64)
    hires = value * 128
    preshift = _srdhm(hires, out_m)
    reluish = tf.where(relu_exp > 0, _saturating_left_shift(hires, tf.maximum(relu_exp - 1, 0)),
                       hires)
    reluish = _srdhm(reluish, relu_m)
    reluish = tf.where(relu_exp > 0, _saturating_left_shift(reluish, 1), reluish)
    reluish = tf.where(relu_exp < 0,
                       _rounding_divide_by_pot(reluish, tf.maximum(-relu_exp, 0)), reluish)
    reluish = tf.bitwise.right_shift(reluish + (1 << 15), 1)
    out = _rounding_divide_by_pot(_sdhm(reluish, preshift), -out_exp)
    out = tf.clip_by_value(out + tf.cast(out_zero, tf.int64), INT8_MIN, INT8_MAX)
    return tf.cast(out, tf.int32)


def hard_swish(x, input_range, output_range):
    """`x * relu6(x + 3) / 6` as TFLite's int8 HARD_SWISH computes it.

    Args:
      x: values on the int8 grid of `input_range` (float32).
      input_range, output_range: `(min, max)` of the input's and the output's FakeQuant.

    Returns:
      The output on the int8 grid of `output_range`; the gradient is that of the float
      hard-swish at `x`.
    """
    x = tf.cast(x, tf.float32)
    in_scale, in_zero = quantization_params(*input_range)
    out_scale, out_zero = quantization_params(*output_range)
    table = hard_swish_table(in_scale, in_zero, out_scale, out_zero)
    q = tf.gather(table, to_int8(x, in_scale, in_zero) - INT8_MIN)
    exact = x * tf.nn.relu6(x + 3.0) / 6.0
    return exact + tf.stop_gradient(from_int8(q, out_scale, out_zero) - exact)
