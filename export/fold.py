"""BatchNorm folding and int8 weight grids (pure numpy; the maths behind `export.graph`).

A BatchNorm with inference statistics after a convolution is a per-output-channel affine map,

    BN(conv(x, W) + b) = conv(x, W * f) + (b * f + beta - mean * f),  f = gamma / sqrt(var + eps),

so folding it multiplies output channel c of the kernel by `f_c`. A kernel fake-quantized on a
b-bit grid, `W_q = s * n` with integers `n` in `[-2^(b-1), 2^(b-1) - 1]`, folds to
`(s * |f_c|) * (sign(f_c) * n)`: the same integers in int8 storage with the per-channel scale
`s * |f_c|`. TFLite's int8 weights are symmetric in `[-127, 127]`, so only the 8-bit value -128
cannot be stored; it moves one step inward (`moved_weights` counts these).

"Channels" below are the output channels TFLite quantizes along: the last kernel axis of a
Conv2D or Dense, `in * multiplier` of a DepthwiseConv2D (whose Keras kernel is
`[kh, kw, in, multiplier]`).
"""
import keras
import numpy as np

from fqat_tf import affine, quant_ops
# TFLite's int8 weights are symmetric, zero point 0, in [-127, 127] (its quantization spec);
# a weight scale is never zero (an all-zero channel would otherwise give scale 0).
from fqat_tf.int8_storage import INT8_WEIGHT_MAX, MIN_WEIGHT_SCALE


def num_channels(kernel_shape, depthwise):
    """Number of output channels of a kernel (see the module docstring)."""
    return kernel_shape[2] * kernel_shape[3] if depthwise else kernel_shape[-1]


def channel_vector(values, kernel_shape, depthwise):
    """A scalar, a per-last-axis vector or a per-channel vector as a float64 `[channels]`."""
    values = np.asarray(values, np.float64)
    if depthwise:
        return np.broadcast_to(values, kernel_shape[2:]).reshape(-1).copy()
    return np.broadcast_to(values, (kernel_shape[-1],)).copy()


def on_kernel(channels, kernel_shape, depthwise):
    """A `[channels]` vector shaped to broadcast against the kernel."""
    return channels.reshape(kernel_shape[2:]) if depthwise else channels


def batchnorm_affine(bn, rank):
    """The inference-mode affine map `(f, offset)` of a Keras BatchNormalization layer
    (`fqat_tf.affine.batchnorm_affine`, in float64), checked to act on the channel axis.

    Args:
      bn: a built `keras.layers.BatchNormalization` normalising the last axis.
      rank: the rank of its input (batch axis included).

    Returns:
      `(f, offset)` float64 arrays of shape `[C]` with `BN(y) = y * f + offset`.

    Raises:
      ValueError: the layer normalises another axis than the last.
    """
    axes = [bn.axis] if isinstance(bn.axis, int) else list(bn.axis)
    if len(axes) != 1 or axes[0] not in (-1, rank - 1):
        raise ValueError(f"BatchNormalization {bn.name!r}: only the last (channel) axis can be "
                         f"folded, got axis={bn.axis!r}")
    return tuple(keras.ops.convert_to_numpy(v) for v in affine.batchnorm_affine(bn, "float64"))


def fold_batchnorm(kernel, bias, f, offset, depthwise=False):
    """Folds the affine map `y * f + offset` that follows a conv or dense into its weights.

    Args:
      kernel: Conv2D `[kh, kw, in, out]`, Dense `[in, out]` or depthwise `[kh, kw, in, mult]`.
      bias: `[channels]` or None (no bias).
      f, offset: per-channel factor and offset, `[channels]`.
      depthwise: the kernel is a DepthwiseConv2D kernel.

    Returns:
      `(kernel, bias)` as float64 arrays; the bias always exists after folding.
    """
    kernel = np.asarray(kernel, np.float64)
    f = np.asarray(f, np.float64)
    bias = np.zeros_like(f) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    folded = kernel * on_kernel(f, kernel.shape, depthwise)
    return folded, bias * f + np.asarray(offset, np.float64)


def grid_integers(kernel_q, step, num_bits):
    """The integers `n = round(W_q / s)` of a fake-quantized kernel, checked to lie on the grid.

    Args:
      kernel_q: the fake-quantized kernel (`QuantizeWrapper.quantized_kernel()`).
      step: its step, scalar or per last-axis channel.
      num_bits: the kernel's bit width.

    Returns:
      float64 array of integers, the kernel's shape.

    Raises:
      ValueError: the kernel is not on the b-bit grid of `step`.
    """
    ratio = np.asarray(kernel_q, np.float64) / np.asarray(step, np.float64)
    ints = np.round(ratio)
    lo, hi = quant_ops.quant_range(num_bits, signed=True)
    if ints.size and (np.abs(ratio - ints).max() > 1e-3 or ints.min() < lo or ints.max() > hi):
        raise ValueError(f"kernel is not on the {num_bits}-bit grid of its step")
    return ints


def folded_grid_kernel(ints, step, f, depthwise=False):
    """A folded b-bit kernel and its per-channel int8 scales `s * |f|`.

    Args:
      ints: the grid integers of the kernel (`grid_integers`).
      step: the learned step, scalar or per last-axis channel.
      f: the folded per-channel factor `[channels]` (ones where nothing was folded).
      depthwise: the kernel is a DepthwiseConv2D kernel.

    Returns:
      `(kernel, scales, moved)`: the float64 kernel `s * n * f` whose values are exactly
      `scales * (sign(f) * n)`, the float64 `[channels]` scales, and the number of integers
      outside `[-127, 127]` (stored one step inward by the converter).
    """
    shape = ints.shape
    step_c = channel_vector(step, shape, depthwise)
    f = np.asarray(f, np.float64)
    scales = np.maximum(step_c * np.abs(f), MIN_WEIGHT_SCALE)
    signed = ints * on_kernel(np.where(f < 0, -1.0, 1.0), shape, depthwise)
    kernel = signed * on_kernel(scales, shape, depthwise)
    return kernel, scales, int(np.sum(np.abs(signed) > INT8_WEIGHT_MAX))
