"""Quantizer objects: which fake-quant op, at what bit width, with which variables.

A quantizer is small and stateless: `build` creates its variables on the layer that owns them
(a `QuantizeWrapper`) and returns them; `__call__` applies the op with those variables;
`get_config` serialises the settings. The learnable step is named `*_step` and carries a
constraint that keeps it at or above `defaults.STEP_FLOOR` after every optimizer update.
"""
import keras
import numpy as np
import tensorflow as tf

from fqat_tf import defaults, quant_ops

GRAD_COUNTS = ("per_tensor", "per_example", "per_channel")


@keras.saving.register_keras_serializable(package="fqat_tf")
class StepFloor(keras.constraints.Constraint):
    """Keeps a quantizer step at or above a positive floor (no division by zero, ever)."""

    def __init__(self, floor=defaults.STEP_FLOOR):
        self.floor = float(floor)

    def __call__(self, w):
        return keras.ops.maximum(w, self.floor)

    def get_config(self):
        return {"floor": self.floor}


class Quantizer:
    """Base class: LSQ forward and step gradient, subclasses choose the x gradient.

    Args:
      num_bits: bit width, 2..8.
      signed: signed grid (weights, normalised images) or unsigned (post-ReLU activations).
      per_channel: one step per channel of the last axis (weights only).
      grad_count: how LSQ's N in `1/sqrt(N u)` is counted: "per_tensor" (every element of the
        tensor, the batch included for activations), "per_example" (one example's elements) or
        "per_channel" (one channel of a per-channel kernel).
    """

    def __init__(self, num_bits, signed, per_channel=False, grad_count="per_tensor"):
        quant_ops.check_bits(num_bits)
        if grad_count not in GRAD_COUNTS:
            raise ValueError(f"grad_count must be one of {GRAD_COUNTS}, got {grad_count!r}")
        self.num_bits = int(num_bits)
        self.signed = bool(signed)
        self.per_channel = bool(per_channel)
        self.grad_count = grad_count

    @property
    def qrange(self):
        """Integer clip range `(l, u)`."""
        return quant_ops.quant_range(self.num_bits, self.signed)

    def step_shape(self, tensor_shape):
        return (int(tensor_shape[-1]),) if self.per_channel else ()

    def build(self, layer, tensor_shape, name):
        """Creates the quantizer's variables on `layer`; returns them by role."""
        step = layer.add_weight(
            name=f"{name}_step", shape=self.step_shape(tensor_shape),
            initializer=keras.initializers.Constant(1.0), trainable=True,
            constraint=StepFloor(), autocast=False)
        return {"step": step}

    def grad_scale(self, x):
        _, hi = self.qrange
        if self.grad_count == "per_example":
            n = int(np.prod(x.shape[1:]))
        elif self.grad_count == "per_channel" and self.per_channel:
            n = int(np.prod(x.shape[:-1]))
        elif x.shape.is_fully_defined():
            n = int(np.prod(x.shape))
        else:
            n = tf.size(x)
        return quant_ops.lsq_grad_scale(n, hi)

    def __call__(self, x, variables):
        # The grid arithmetic runs in float32 whatever the compute dtype (a bf16 x / s cannot
        # even represent every level of an 8-bit grid); the result returns in x's dtype.
        y = self._fake_quant(tf.cast(x, tf.float32), variables)
        return tf.cast(y, x.dtype)

    def _fake_quant(self, x, variables):
        raise NotImplementedError

    def get_config(self):
        return {"num_bits": self.num_bits, "signed": self.signed,
                "per_channel": self.per_channel, "grad_count": self.grad_count}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="fqat_tf")
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2020)."""

    def _fake_quant(self, x, variables):
        return quant_ops.lsq_fake_quant(
            x, variables["step"].value, num_bits=self.num_bits, signed=self.signed,
            grad_scale=self.grad_scale(x))


@keras.saving.register_keras_serializable(package="fqat_tf")
class EWGSQuantizer(Quantizer):
    """Element-Wise Gradient Scaling (Lee et al. 2021) on LSQ's step parameterisation.

    Args:
      delta: initial EWGS delta (normalised units); held in a non-trainable variable so the
        Hessian-based refresh (`fqat_tf.ewgs.EWGSDeltaCallback`) can change it during training.
      delta_mode: "fixed" or "hessian" (documentation of intent; the callback does the refresh).
      Other arguments as `Quantizer`.
    """

    def __init__(self, num_bits, signed, per_channel=False, grad_count="per_tensor",
                 delta=defaults.EWGS_DELTA, delta_mode=defaults.EWGS_DELTA_MODE):
        super().__init__(num_bits, signed, per_channel, grad_count)
        if delta < 0:
            raise ValueError(f"EWGS delta must be >= 0, got {delta!r}")
        if delta_mode not in ("fixed", "hessian"):
            raise ValueError(f"delta_mode must be 'fixed' or 'hessian', got {delta_mode!r}")
        self.delta = float(delta)
        self.delta_mode = delta_mode

    def build(self, layer, tensor_shape, name):
        variables = super().build(layer, tensor_shape, name)
        variables["delta"] = layer.add_weight(
            name=f"{name}_ewgs_delta", shape=(),
            initializer=keras.initializers.Constant(self.delta), trainable=False,
            autocast=False)
        return variables

    def _fake_quant(self, x, variables):
        return quant_ops.ewgs_fake_quant(
            x, variables["step"].value, num_bits=self.num_bits, signed=self.signed,
            grad_scale=self.grad_scale(x), delta=variables["delta"].value)

    def get_config(self):
        return {**super().get_config(), "delta": self.delta, "delta_mode": self.delta_mode}


QUANTIZERS = {"lsq": LSQQuantizer, "ewgs": EWGSQuantizer}


def get_quantizer_class(name):
    """Looks up a quantizer by its registry name ("lsq" or "ewgs")."""
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; choose from {sorted(QUANTIZERS)}") from None
