"""Fake-quantization maths: LSQ and EWGS with hand-written gradients (docs/algorithm.md §1).

Both quantizers compute the symmetric uniform grid `q(v; s) = s * round(clip(v / s, l, u))`
with a learnable step `s > 0`, and differ only in the gradient they pass to `v`:

* LSQ (Esser et al. 2020): straight-through inside the clip range, zero outside.
* EWGS (Lee et al. 2021): inside the range the upstream gradient is scaled element-wise by
  `1 + delta * sign(g) * d` with `d = (v/s - round(v/s)) / (u - l)`, so a latent value is pushed
  towards the grid point it was rounded to.

Both give the step the LSQ gradient

    dL/ds = g_s * sum(dL/dq * (round(v/s) - v/s  if l <= v/s <= u,  l if below,  u if above)),

with `g_s = 1 / sqrt(N * u)` supplied by the caller (see `lsq_grad_scale`). A step of shape `[C]`
quantizes per channel along the last axis of `x`.

The step is clamped at `defaults.STEP_FLOOR` inside the op (and kept there by the variable
constraint of `fqat_tf.quantizers`), so `v / s` is always defined.
"""
import math

import numpy as np
import tensorflow as tf

from fqat_tf import defaults


def quant_range(num_bits, signed):
    """Integer clip range `(l, u)` of a `num_bits` grid.

    Args:
      num_bits: bit width, 2..8.
      signed: weights and the normalised network input are signed; post-ReLU activations are not.

    Returns:
      `(l, u)` as floats: `(-2^(b-1), 2^(b-1) - 1)` signed, `(0, 2^b - 1)` unsigned.
    """
    check_bits(num_bits)
    if signed:
        return -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1.0
    return 0.0, 2.0 ** num_bits - 1.0


def check_bits(num_bits, what="num_bits"):
    """Raises ValueError unless `num_bits` is an integer in the supported range."""
    if (isinstance(num_bits, bool) or not isinstance(num_bits, int)
            or not defaults.MIN_BITS <= num_bits <= defaults.MAX_BITS):
        raise ValueError(f"{what} must be an integer in {defaults.MIN_BITS}..{defaults.MAX_BITS}, "
                         f"got {num_bits!r}")


def grid_round(ratio, lo, hi):
    """`round(clip(ratio, lo, hi))`: the grid integers of `ratio = v / s`.

    Serves numpy values (float64 arithmetic of reports and export) and tensors alike; both
    round half to even.
    """
    if isinstance(ratio, (np.ndarray, np.generic, float, int)):
        return np.round(np.clip(ratio, lo, hi))
    return tf.round(tf.clip_by_value(ratio, lo, hi))


def grid_quantize(v, step, lo, hi):
    """`s * round(clip(v / s, lo, hi))`, the forward pass of every quantizer (`grid_round`)."""
    return grid_round(v / step, lo, hi) * step


def lsq_grad_scale(num_elements, upper):
    """LSQ's step-gradient scale `1 / sqrt(N * u)`; `num_elements` may be a tensor."""
    if isinstance(num_elements, (int, float)):
        return 1.0 / math.sqrt(float(num_elements) * upper)
    return tf.math.rsqrt(tf.cast(num_elements, tf.float32) * upper)


def _reduce_to_step(t, step):
    """Sums `t` (shaped like x) down to the step's shape: all axes, or all but the last."""
    if step.shape.rank == 0:
        return tf.reduce_sum(t)
    return tf.reduce_sum(t, axis=tf.range(tf.rank(t) - 1))


def _fake_quant(x, step, num_bits, signed, grad_scale, delta):
    """Shared forward and gradient; `delta=None` is LSQ, a scalar tensor is EWGS."""
    lo, hi = quant_range(num_bits, signed)

    @tf.custom_gradient
    def fq(x, step):
        s = tf.maximum(step, defaults.STEP_FLOOR)
        v = x / s
        rounded = grid_round(v, lo, hi)
        below, above = v < lo, v > hi
        inside = tf.logical_not(tf.logical_or(below, above))

        def grad(dy):
            inside_f = tf.cast(inside, dy.dtype)
            if delta is None:
                dx = dy * inside_f
            else:
                d = (v - rounded) / (hi - lo)
                dx = dy * inside_f * (1.0 + tf.cast(delta, dy.dtype) * tf.sign(dy) * d)
            ds_elem = tf.where(below, lo, tf.where(above, hi, rounded - v))
            ds = _reduce_to_step(dy * ds_elem, step) * grad_scale
            # Below the floor the forward pass does not depend on the variable.
            ds = ds * tf.cast(step >= defaults.STEP_FLOOR, ds.dtype)
            return dx, ds

        return rounded * s, grad

    x = tf.convert_to_tensor(x)
    step = tf.cast(tf.convert_to_tensor(step), x.dtype)
    return fq(x, step)


def lsq_fake_quant(x, step, *, num_bits, signed, grad_scale):
    """LSQ fake quantization with the straight-through estimator.

    Args:
      x: tensor to quantize (float32).
      step: scalar step, or shape `[C]` for per-channel steps along the last axis of `x`. Pass a
        tensor (e.g. `variable.value`), not a variable object.
      num_bits: bit width, 2..8.
      signed: grid `[-2^(b-1), 2^(b-1)-1]` if True, `[0, 2^b-1]` if False.
      grad_scale: `g_s` multiplying the step gradient; `lsq_grad_scale(N, u)`.

    Returns:
      `s * round(clip(x / s, l, u))`; gradients as in the module docstring.
    """
    return _fake_quant(x, step, num_bits, signed, grad_scale, None)


def ewgs_fake_quant(x, step, *, num_bits, signed, grad_scale, delta):
    """EWGS fake quantization: LSQ forward and step gradient, element-wise scaled x gradient.

    Args:
      x, step, num_bits, signed, grad_scale: as `lsq_fake_quant`.
      delta: EWGS scaling factor (float or scalar tensor, >= 0), in units normalised by `u - l`.

    Returns:
      The fake-quantized tensor.
    """
    return _fake_quant(x, step, num_bits, signed, grad_scale, delta)
