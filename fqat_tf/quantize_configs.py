"""Quantize configs: which tensor of a layer gets which quantizer (in the spirit of tfmot).

A config tells the `fqat_tf.wrapper.QuantizeWrapper` everything that depends on the wrapped
layer: which quantizer its kernel and its input get, and (`kernel_ops`) how that layer type
shows its kernel to a quantizer and runs with the quantized one. The wrapper itself knows no
layer type; adding one is one `KERNEL_OPS` entry.

Three configs cover the FQAT policy (docs/algorithm.md §1):

* `WeightInputQuantizeConfig`: a conv or dense quantizes its kernel (signed) and its input.
* `InputOnlyQuantizeConfig`: the first conv quantizes only its (signed, normalised) input.
* `NoQuantizeConfig`: the classifier stays float.

A fourth serves integer export: `WeightOnlyQuantizeConfig` quantizes the kernel and leaves the
input to the 8-bit storage of the integer model (`quantize_model(shared_inputs="stored")`).
"""
import keras

from fqat_tf import quantizers as quantizers_lib


class KernelOps:
    """How one weighted layer type runs with a kernel the wrapper gives it.

    `kernel_view` is the kernel as a quantizer sees it, one output channel per index of the
    last axis; `linear` computes the layer's output before bias and activation.
    """

    #: TFLite stores this layer's int8 kernel with one scale per output channel.
    int8_per_channel = True

    def kernel_view(self, kernel):
        return kernel

    def linear(self, layer, x, kernel):
        raise NotImplementedError


class _ConvOps(KernelOps):
    def linear(self, layer, x, kernel):
        return layer.convolution_op(x, kernel)


class _DepthwiseOps(KernelOps):
    def kernel_view(self, kernel):
        # `[kh, kw, in, multiplier]` as `[kh, kw, 1, in * multiplier]`: TFLite's channel order.
        kh, kw, cin, mult = kernel.shape
        return keras.ops.reshape(kernel, (kh, kw, 1, cin * mult))

    def linear(self, layer, x, kernel):
        return keras.ops.depthwise_conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                        dilation_rate=layer.dilation_rate,
                                        data_format=layer.data_format)


class _DenseOps(KernelOps):
    # The converter rejects a per-axis FakeQuant on a Dense kernel (docs/algorithm.md §5).
    int8_per_channel = False

    def linear(self, layer, x, kernel):
        return keras.ops.matmul(x, kernel)


KERNEL_OPS = {keras.layers.Conv2D: _ConvOps(), keras.layers.DepthwiseConv2D: _DepthwiseOps(),
              keras.layers.Dense: _DenseOps()}


def kernel_ops(layer):
    """The `KernelOps` of `layer`'s exact type.

    Raises:
      ValueError: the type has none (subclasses such as SeparableConv2D compute otherwise).
    """
    try:
        return KERNEL_OPS[type(layer)]
    except KeyError:
        raise ValueError(f"no quantize config can wrap {type(layer).__name__} (layer "
                         f"{layer.name!r}); supported: "
                         f"{[t.__name__ for t in KERNEL_OPS]}") from None


def _serialize(quantizer):
    return None if quantizer is None else keras.saving.serialize_keras_object(quantizer)


def _deserialize(config):
    return None if config is None else keras.saving.deserialize_keras_object(config)


class QuantizeConfig:
    """Base config. Subclasses set `weight_quantizer` and `input_quantizer` (or None)."""

    weight_quantizer = None
    input_quantizer = None

    @property
    def is_float(self):
        return self.weight_quantizer is None and self.input_quantizer is None

    def kernel_ops(self, layer):
        """How `layer` shows its kernel to `weight_quantizer` and runs with the result."""
        return kernel_ops(layer)

    def get_config(self):
        return {"weight_quantizer": _serialize(self.weight_quantizer),
                "input_quantizer": _serialize(self.input_quantizer)}

    @classmethod
    def from_config(cls, config):
        return cls(**{k: _deserialize(v) for k, v in config.items()})

    def __repr__(self):
        return (f"{type(self).__name__}(weight={self.weight_quantizer!r}, "
                f"input={self.input_quantizer!r})")


@keras.saving.register_keras_serializable(package="fqat_tf")
class WeightInputQuantizeConfig(QuantizeConfig):
    """Kernel and input quantized (every conv and dense but the first and the classifier)."""

    def __init__(self, weight_quantizer, input_quantizer):
        if weight_quantizer is None or input_quantizer is None:
            raise ValueError("WeightInputQuantizeConfig needs both quantizers")
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer


@keras.saving.register_keras_serializable(package="fqat_tf")
class InputOnlyQuantizeConfig(QuantizeConfig):
    """Input quantized, kernel float (the first conv: its weights stay full precision)."""

    def __init__(self, input_quantizer, weight_quantizer=None):
        if input_quantizer is None or weight_quantizer is not None:
            raise ValueError("InputOnlyQuantizeConfig takes an input quantizer only")
        self.input_quantizer = input_quantizer


@keras.saving.register_keras_serializable(package="fqat_tf")
class WeightOnlyQuantizeConfig(QuantizeConfig):
    """Kernel quantized, input read as it is stored: float in the paper's recipe, on its 8-bit
    range with int8 storage (`fqat_tf.storage`), as the integer model reads it."""

    def __init__(self, weight_quantizer, input_quantizer=None):
        if weight_quantizer is None or input_quantizer is not None:
            raise ValueError("WeightOnlyQuantizeConfig takes a weight quantizer only")
        self.weight_quantizer = weight_quantizer


@keras.saving.register_keras_serializable(package="fqat_tf")
class NoQuantizeConfig(QuantizeConfig):
    """Nothing quantized (the classifier)."""

    def __init__(self, weight_quantizer=None, input_quantizer=None):
        if weight_quantizer is not None or input_quantizer is not None:
            raise ValueError("NoQuantizeConfig takes no quantizers")


POLICIES = ("full", "input_only", "weight_only", "float")


def make_config(policy, *, quantizer, weight_bits, activation_bits, per_channel,
                input_signed, weight_grad_count, act_grad_count, quantizer_kwargs=None):
    """Builds the config of one layer from a policy name and bit widths.

    Args:
      policy: "full" (kernel and input), "input_only", "weight_only" or "float".
      quantizer: quantizer registry name ("lsq" or "ewgs").
      weight_bits, activation_bits: bit widths.
      per_channel: per-channel kernel steps.
      input_signed: whether the layer's input can be negative (decided from the graph).
      weight_grad_count, act_grad_count: LSQ N counting for kernel and input.
      quantizer_kwargs: extra constructor arguments of the quantizer class (e.g. EWGS delta).

    Returns:
      A `QuantizeConfig`.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown quantize policy {policy!r}; choose from {POLICIES}")
    if policy == "float":
        return NoQuantizeConfig()
    cls = quantizers_lib.get_quantizer_class(quantizer)
    extra = dict(quantizer_kwargs or {})
    act_count = "per_example" if act_grad_count == "per_example" else "per_tensor"
    input_q = (None if policy == "weight_only" else
               cls(activation_bits, signed=input_signed, grad_count=act_count, **extra))
    if policy == "input_only":
        return InputOnlyQuantizeConfig(input_q)
    w_count = "per_channel" if (per_channel and weight_grad_count == "per_channel") else "per_tensor"
    weight_q = cls(weight_bits, signed=True, per_channel=per_channel, grad_count=w_count, **extra)
    if policy == "weight_only":
        return WeightOnlyQuantizeConfig(weight_q)
    return WeightInputQuantizeConfig(weight_q, input_q)
