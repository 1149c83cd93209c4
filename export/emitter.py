"""The fake-quant ops of one build of an `export.graph.ExportGraph`.

An `Emitter` is created per build and mode: in "observe" mode it applies the learned
quantizers exactly as the Keras model does and records the range of every tensor the Keras
model keeps float; in "int8" mode it inserts the FakeQuant ops the TFLite converter turns into
int8 tensors; in "float" mode it inserts nothing.
"""
import numpy as np
import tensorflow as tf

from export import fold
from fqat_tf import int8_storage
from fqat_tf.storage import Fixed, Range, Spec


def as_4d(x):
    """`x` as an NHWC tensor (a `[batch, channels]` one as `[batch, 1, 1, channels]`), and the
    function that restores its shape."""
    shape = x.shape
    if len(shape) == 4:
        return x, lambda y: y
    return (tf.reshape(x, [-1, 1, 1, int(shape[-1])]),
            lambda y: tf.reshape(y, [-1] + [int(d) for d in shape[1:]]))


def _unit_depthwise(x):
    """`x` through a 1x1 depthwise convolution with weights 1 (int8 127, scale 1/127)."""
    y, restore = as_4d(x)
    ones = tf.quantization.fake_quant_with_min_max_args(
        tf.ones([1, 1, int(x.shape[-1]), 1]), -1.0, 1.0, num_bits=8, narrow_range=True)
    return restore(tf.nn.depthwise_conv2d(y, ones, [1, 1, 1, 1], "VALID"))


class Emitter:
    """Adds (or, in "observe" mode, records instead of) the fake-quant ops of one build."""

    def __init__(self, mode, ranges, stored=None):
        """`ranges`: `{name: (min, max)}` of every range tensor (int8 mode); `stored`: those the
        Keras model quantizes itself (`fqat_tf.int8_storage`), applied in observe mode too."""
        if mode == "int8" and ranges is None:
            raise ValueError("int8 mode needs the ranges recorded by observe mode")
        self.mode = mode
        self.ranges = ranges
        self.stored = stored or {}
        self.observed = {}

    def spec(self, x, spec, requantize=False, on_grid=False):
        """The learned quantizer; at 8 bits on the int8 grid of its step.

        `requantize`: `x` carries another fake-quant already. The clip ops come first, then a
        1x1 depthwise convolution with unit weights carries the values to the new scale. The
        converter would otherwise merge the two FakeQuants into one, or emit a QUANTIZE op,
        which XNNPACK runs with an 8-bit fixed-point multiplier (a scale ratio of 1/19 comes
        out 3.5% off, and a value in four moves by one step); a convolution requantizes with
        a float multiplier. The clip constant differs from one step to another, so two such
        paths from one tensor stay two (the converter merges identical ops, and a merged op
        has one output scale). `on_grid`: `x` holds values of this grid already (after a
        passthrough layer), so no clip is needed. An unsigned grid needs no MAXIMUM: its input
        is a ReLU output and FakeQuant's own lower bound is 0.
        """
        s = spec.step
        if self.mode == "float":
            return x
        if self.mode == "observe":
            return tf.round(tf.clip_by_value(x / s, spec.lo, spec.hi)) * s
        lo8, hi8 = (-128, 127) if spec.lo < 0 else (0, 255)
        if not on_grid and (spec.hi < hi8 or requantize):
            x = tf.minimum(x, spec.hi * s)
        if not on_grid and (spec.lo > lo8 or (requantize and spec.lo < 0)):
            x = tf.maximum(x, spec.lo * s)
        if requantize:
            x = _unit_depthwise(x)
        return tf.quantization.fake_quant_with_min_max_args(x, *self.spec_range(spec),
                                                            num_bits=8)

    @staticmethod
    def spec_range(spec):
        """The FakeQuant `(min, max)` of the int8 tensor that holds a learned grid."""
        lo8, hi8 = (-128, 127) if spec.lo < 0 else (0, 255)
        return lo8 * spec.step, hi8 * spec.step

    def range(self, layer_name, part, x, clip=None):
        """An 8-bit range fake-quant on a tensor the Keras model keeps float.

        `clip=(lo, hi)` bounds the recorded range where every reader clips the tensor there.
        """
        name = layer_name if part is None else f"{layer_name}/{part}"
        if self.mode == "observe" and name in self.stored:
            lo, hi = self.stored[name]
            return tf.quantization.fake_quant_with_min_max_args(x, lo, hi, num_bits=8)
        if self.mode == "observe":
            lo, hi = tf.reduce_min(x), tf.reduce_max(x)
            if clip is not None:
                lo, hi = tf.clip_by_value(lo, *clip), tf.clip_by_value(hi, *clip)
            if name in self.observed:
                lo = tf.minimum(lo, self.observed[name][0])
                hi = tf.maximum(hi, self.observed[name][1])
            self.observed[name] = (lo, hi)
            return x
        if self.mode == "float":
            return x
        if name not in self.ranges:
            raise ValueError(f"no recorded range for tensor {name!r}")
        lo, hi = self.ranges[name]
        return tf.quantization.fake_quant_with_min_max_args(x, lo, hi, num_bits=8)

    def grid(self, x, grid, on_grid=False):
        """`x` on `grid` (a `fqat_tf.storage` `Spec`, `Range` or `Fixed`; None: unchanged).

        `on_grid`: `x` holds values of this grid already (after a passthrough layer).
        """
        if isinstance(grid, Spec):
            return self.spec(x, grid, on_grid=on_grid)
        if isinstance(grid, Range):
            return self.range(grid.name, None, x)
        if isinstance(grid, Fixed):
            return self.fixed(x, grid)
        return x

    def fixed(self, x, grid):
        """A grid a TFLite kernel fixes (a `Fixed`). The Keras model is on it already where
        it quantizes the tensor itself, and float where it does not, so only "int8" adds it."""
        if self.mode != "int8":
            return x
        return tf.quantization.fake_quant_with_min_max_args(x, grid.lo, grid.hi, num_bits=8)

    def stored_input(self, name, x, carried):
        """`x` on range `name`, the range a layer keeps its input on (a storage layer's trained
        one, or observed like any range tensor's).

        `carried`: the `(min, max)` of the 8-bit grid `x` is on already in "int8" mode, or
        None. The same grid needs nothing; another one is requantized first, as `spec` does.
        """
        if self.mode == "float" or (self.mode == "observe" and name not in self.stored):
            return self.range(name, None, x)
        lo, hi = self.stored[name] if self.mode == "observe" else self.ranges[name]
        if self.mode == "int8" and carried is not None:
            if np.allclose(carried, (lo, hi), rtol=0.0, atol=0.0):
                return x
            x = _unit_depthwise(x)
        return tf.quantization.fake_quant_with_min_max_args(x, lo, hi, num_bits=8)

    def affine_kernel(self, f):
        """A depthwise `[1, 1, channels, 1]` kernel multiplying channel c by `f[c]`, in "int8"
        mode on its per-channel int8 grid (scale `|f| / 127`: the weights are exact)."""
        f = np.asarray(f, np.float32)
        k = tf.constant(f.reshape(1, 1, 1, -1))
        if self.mode == "int8":
            limit = np.maximum(np.abs(f), np.float32(int8_storage.MIN_WEIGHT_SCALE))
            k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                k, -limit, limit, num_bits=8, narrow_range=True)
        return tf.reshape(k, [1, 1, -1, 1])

    def kernel(self, w):
        """The layer's kernel constant, fake-quantized per channel (or per tensor) in int8."""
        k = tf.constant(w.kernel.astype(np.float32))
        if w.as_conv:
            k = tf.reshape(k, [1, 1] + list(w.kernel.shape))
        # Observe mode is the Keras model: learned kernels are on their grid already, and the
        # first conv and the classifier are float there.
        if self.mode != "int8":
            return k
        scales = w.scales.astype(np.float32)
        limit = fold.INT8_WEIGHT_MAX
        if np.ndim(scales) == 0:
            return tf.quantization.fake_quant_with_min_max_args(
                k, -limit * float(scales), limit * float(scales), num_bits=8, narrow_range=True)
        shape = k.shape
        if w.depthwise:
            k = tf.reshape(k, [shape[0], shape[1], 1, -1])
        k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            k, -limit * scales, limit * scales, num_bits=8, narrow_range=True)
        return tf.reshape(k, shape) if w.depthwise else k

    def constant(self, values, always=False):
        """A float constant operand (GroupNorm's gamma and beta), 8-bit on its own range.

        `always`: the Keras model quantizes it too, so observe mode does as well.
        """
        values = np.asarray(values, np.float32)
        c = tf.constant(values)
        if self.mode == "float" or (self.mode == "observe" and not always):
            return c
        lo, hi = int8_storage.effective_range(float(values.min()), float(values.max()))
        return tf.quantization.fake_quant_with_min_max_args(c, lo, hi, num_bits=8)
