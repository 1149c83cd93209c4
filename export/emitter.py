"""The fake-quant ops of one build of an `export.graph.ExportGraph`.

An `Emitter` is created per build and mode: in "observe" mode it applies the learned
quantizers exactly as the Keras model does and records the range of every tensor the Keras
model keeps float; in "int8" mode it inserts the FakeQuant ops the TFLite converter turns into
int8 tensors; in "float" mode it inserts nothing.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from export import fold
from fqat_tf import int8_storage, quant_ops
from fqat_tf.storage import Fixed, Range, Spec


def _times_one(x, k):
    """`x` times an exact 1, stored as the int8 integer `k - 128` with scale `1/k`: a MUL that
    only changes the scale. XNNPACK requantizes a product in float (exact but for ties, like
    a convolution, and faster than one); its QUANTIZE op uses an 8-bit fixed-point multiplier
    (a scale ratio of 1/19 comes out 3.5% off, and a value in four moves by one step). `k`
    (2..255) keeps two such ops on one tensor apart: the converter merges identical ops, and a
    merged op has one output scale."""
    one = tf.quantization.fake_quant_with_min_max_args(tf.ones([]), 0.0, 255.0 / k, num_bits=8)
    return x * one


KERNEL_PREFIX = "kernel_of_"


def kernel_name(layer_name):
    """The name of the op that makes a layer's int8 kernel (`Emitter.kernel`)."""
    return KERNEL_PREFIX + layer_name


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a learned b-bit grid `[lo, hi] * step` sits in its int8 tensor: FakeQuant range
    `[lo8, hi8] * step` (255 steps), and whether the upper bound needs a clip (`Emitter.spec`).

    The int8 tensor saturates at its own ends, so one b-bit bound that coincides with an end
    costs nothing; so does one the values provably never pass (`ExportGraph.layout`).
    """

    lo8: int
    hi8: int
    clip_hi: bool


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
        self._requantized = 0

    def requantize(self, x):
        """`x` (on one int8 grid) through an op that puts it on the grid of the FakeQuant
        that follows (`_times_one`, a distinct `k` each time)."""
        k = 255 - self._requantized % 127
        self._requantized += 1
        return _times_one(x, k)

    def spec(self, x, spec, layout=None, requantize=False, on_grid=False):
        """The learned quantizer; at 8 bits on the int8 grid of its step.

        `layout`: where the b-bit grid sits in the int8 tensor ("int8" mode, `Layout`).
        `requantize`: `x` carries another fake-quant already, so `requantize` carries the
        values to the new scale (left alone, the converter would merge the two FakeQuants
        into one). `on_grid`: `x` holds values of this grid already (after a passthrough
        layer), so no clip is needed.

        A grid whose upper bound needs a clip (`layout.clip_hi`) is clipped by saturation
        twice: first on an int8 tensor whose maximum is the grid's maximum, then, requantized
        exactly to the same step, on the bottom layout whose minimum is the grid's minimum.
        XNNPACK runs both ops; an int8 MINIMUM it does not, and each one would split its
        partition.
        """
        s = spec.step
        if self.mode == "float":
            return x
        if self.mode == "observe":
            return quant_ops.grid_quantize(x, s, spec.lo, spec.hi)
        if not on_grid and layout.clip_hi:
            if requantize:
                x = self.requantize(x)
            x = tf.quantization.fake_quant_with_min_max_args(x, (spec.hi - 255) * s, spec.hi * s,
                                                             num_bits=8)
            requantize = True
        if requantize:
            x = self.requantize(x)
        return tf.quantization.fake_quant_with_min_max_args(x, layout.lo8 * s, layout.hi8 * s,
                                                            num_bits=8)

    def range(self, layer_name, part, x, clip=None):
        """An 8-bit range fake-quant on a tensor the Keras model keeps float.

        `clip=(lo, hi)` bounds the recorded range where every reader clips the tensor there.
        """
        name = layer_name if part is None else f"{layer_name}/{part}"
        if self.mode == "observe" and name in self.stored:
            return int8_storage.range_quantize(x, *self.stored[name])
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

    def grid(self, x, grid, layout=None, on_grid=False):
        """`x` on `grid` (a `fqat_tf.storage` `Spec`, `Range` or `Fixed`; None: unchanged).

        `layout`: a `Spec`'s `Layout`. `on_grid`: `x` holds values of this grid already (after
        a passthrough layer).
        """
        if isinstance(grid, Spec):
            return self.spec(x, grid, layout, on_grid=on_grid)
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
            x = self.requantize(x)
        return tf.quantization.fake_quant_with_min_max_args(x, lo, hi, num_bits=8)

    def affine_kernel(self, f):
        """A depthwise `[1, 1, channels, 1]` kernel multiplying channel c by `f[c]`, in "int8"
        mode on its per-channel int8 grid (scale `|f| / 127`: the weights are exact)."""
        f = np.asarray(f, np.float32)
        k = tf.constant(f.reshape(1, 1, 1, -1))
        if self.mode == "int8":
            # 127 steps of the int8 scale: |f| itself (as float32, exactly), the floor aside.
            scales = int8_storage.abs_max_scales(f.reshape(1, -1))
            limit = (scales * int8_storage.INT8_WEIGHT_MAX).astype(np.float32)
            k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                k, -limit, limit, num_bits=8, narrow_range=True)
        return tf.reshape(k, [1, 1, -1, 1])

    def kernel(self, w, layer_name):
        """The layer's kernel constant, fake-quantized per channel (or per tensor) in int8; the
        FakeQuant op is named `kernel_name(layer_name)`, which the converter keeps in the
        weight tensor's name."""
        name = kernel_name(layer_name)
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
                k, -limit * float(scales), limit * float(scales), num_bits=8, narrow_range=True,
                name=name)
        shape = k.shape
        if w.depthwise:
            k = tf.reshape(k, [shape[0], shape[1], 1, -1])
        k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            k, -limit * scales, limit * scales, num_bits=8, narrow_range=True, name=name)
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
