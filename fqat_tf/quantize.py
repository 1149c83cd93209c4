"""`quantize_model`: wrap every conv and dense of a Keras 3 model in a `QuantizeWrapper`.

The default policy (ALGORITHM.md §1): the first conv quantizes only its input (signed), the
classifier stays float, every other Conv2D / DepthwiseConv2D / Dense quantizes its kernel
(signed) and its input. The classifier is the last Dense, or in a network without one the conv
that makes the logits (its output reaches the model output through reshapes and activations
only, as in MobileNetV3). An input is quantized unsigned only where the graph proves it is
non-negative (it comes from a ReLU, ReLU6, sigmoid, hard-sigmoid or softmax, possibly through
pooling, padding or an add or product of such tensors; `fqat_tf.activations` holds the
bounds); otherwise it is signed, so GroupNorm outputs, hard-swish outputs or normalised images
are never clipped at zero. The model is first flattened (`fqat_tf.flatten`): nested models
inlined, activations TFLite cannot fuse moved out of convs into layers of their own.
"""
import logging
import re

import keras
import numpy as np

from fqat_tf import activations
from fqat_tf import defaults
from fqat_tf import int8_activations
from fqat_tf import int8_storage
from fqat_tf.flatten import flatten_model
from fqat_tf import quant_ops
from fqat_tf import quantize_configs as qc

log = logging.getLogger(__name__)

QUANTIZABLE_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
_CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
_PASSTHROUGH_TYPES = (
    keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Reshape,
    keras.layers.Dropout, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
    keras.layers.UpSampling2D, keras.layers.Identity)
_ALL_INPUTS_TYPES = (keras.layers.Add, keras.layers.Concatenate, keras.layers.Maximum,
                     keras.layers.Average, keras.layers.Multiply)
_SHAPE_TYPES = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Dropout,
                keras.layers.Identity, keras.layers.Activation, keras.layers.ReLU)


@keras.saving.register_keras_serializable(package="fqat_tf")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs a Conv2D, DepthwiseConv2D or Dense on fake-quantized input and kernel.

    The wrapper owns the quantizer variables; the inner layer keeps its own kernel and bias, so
    the float weights are the latent weights QAT trains.

    Args:
      layer: the Keras layer to wrap (one of `QUANTIZABLE_TYPES`).
      quantize_config: a `QuantizeConfig` naming the kernel and input quantizers.
      int8_storage: the weights as an integer model stores them (`fqat_tf.int8_storage`): a
        kernel the config leaves float on its symmetric int8 grid (per output channel; per
        tensor for Dense), an 8-bit learned kernel without its -128, and, where the input is
        quantized, the bias on the int32 grid of input step times kernel scale.
      batchnorm: a `keras.layers.BatchNormalization` applied to the (linear) output, as an
        integer model folds it into the kernel and bias: with inference statistics the output
        is `conv(x, W) * f + (b * f + beta - mean * f)`, and with `int8_storage` that offset
        sits on the int32 grid of input step times kernel scale times `|f|` (TFLite's folded
        bias). Training-mode statistics apply it as a plain BatchNorm.
    """

    def __init__(self, layer, quantize_config, int8_storage=False, batchnorm=None, **kwargs):
        if type(layer) not in QUANTIZABLE_TYPES:
            raise ValueError(f"QuantizeWrapper cannot wrap {type(layer).__name__} "
                             f"(layer {layer.name!r}); supported: "
                             f"{[t.__name__ for t in QUANTIZABLE_TYPES]}")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.quantize_config = quantize_config
        self.int8_storage = bool(int8_storage)
        if batchnorm is not None and not isinstance(batchnorm, keras.layers.BatchNormalization):
            raise ValueError(f"layer {layer.name!r}: batchnorm must be a BatchNormalization, "
                             f"got {type(batchnorm).__name__}")
        if batchnorm is not None and layer.activation not in (None, keras.activations.linear):
            raise ValueError(f"layer {layer.name!r}: a BatchNormalization folds only into a "
                             f"linear layer")
        self.batchnorm = batchnorm

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        cfg = self.quantize_config
        # Plain attributes (not tracked collections): add_weight already tracks the variables.
        object.__setattr__(self, "_weight_vars", None if cfg.weight_quantizer is None else
                           cfg.weight_quantizer.build(self, self.kernel_view().shape, "kernel"))
        object.__setattr__(self, "_input_vars", None if cfg.input_quantizer is None else
                           cfg.input_quantizer.build(self, input_shape, "input"))
        if self.batchnorm is not None and not self.batchnorm.built:
            self.batchnorm.build(self.layer.compute_output_shape(input_shape))
        self.built = True

    @property
    def scale_variables(self):
        """The learnable steps of this layer: kernel step first, then input step."""
        return [v["step"] for v in (self._weight_vars, self._input_vars) if v is not None]

    @property
    def weight_variables(self):
        """Kernel quantizer variables by role (None if the kernel is float)."""
        return self._weight_vars

    @property
    def input_variables(self):
        """Input quantizer variables by role (None if the input is float)."""
        return self._input_vars

    def kernel_view(self):
        """The kernel as its quantizer sees it: one output channel per index of the last axis.

        A depthwise kernel `[kh, kw, in, multiplier]` is viewed as `[kh, kw, 1, in *
        multiplier]` (TFLite's channel order), so a per-channel step has one value per output
        channel; other kernels are themselves.
        """
        kernel = self.layer.kernel
        if isinstance(self.layer, keras.layers.DepthwiseConv2D):
            kh, kw, cin, mult = kernel.shape
            return keras.ops.reshape(kernel, (kh, kw, 1, cin * mult))
        return kernel

    def quantized_kernel(self):
        """The kernel as the forward pass sees it (fake-quantized, or float)."""
        q = self.quantize_config.weight_quantizer
        kernel = self.layer.kernel
        if q is not None:
            kq = q(self.kernel_view(), self._weight_vars)
            if self.int8_storage and q.signed and q.num_bits == 8:
                # TFLite's int8 weights are symmetric: the 8-bit grid's -128 is stored as -127.
                step = keras.ops.convert_to_tensor(self._weight_vars["step"])
                kq = keras.ops.maximum(kq, -int8_storage.INT8_WEIGHT_MAX * step)
            return keras.ops.reshape(kq, kernel.shape)
        if self.int8_storage:
            return int8_storage.int8_kernel(
                kernel, depthwise=isinstance(self.layer, keras.layers.DepthwiseConv2D),
                per_channel=not isinstance(self.layer, keras.layers.Dense))
        return kernel

    def kernel_scales(self):
        """Per output channel (`[channels]`) or scalar scale of the kernel's integers: the
        learned step, the int8 scale of an `int8_storage` float kernel, or None (float)."""
        inner = self.layer
        depthwise = isinstance(inner, keras.layers.DepthwiseConv2D)
        if self.quantize_config.weight_quantizer is not None:
            step = self._weight_vars["step"]
        elif self.int8_storage:
            step = int8_storage.int8_kernel_scales(
                inner.kernel, depthwise, per_channel=not isinstance(inner, keras.layers.Dense))
        else:
            return None
        step = keras.ops.convert_to_tensor(step)
        if len(step.shape) == 0:
            return step
        shape = inner.kernel.shape
        if depthwise and self.quantize_config.weight_quantizer is None:
            return keras.ops.reshape(keras.ops.broadcast_to(step, shape[2:]), [-1])
        return keras.ops.broadcast_to(step, [self.kernel_view().shape[-1]])

    def quantized_bias(self):
        """The bias as the forward pass sees it: on the int32 grid of input step times kernel
        scale with `int8_storage` and a quantized input and kernel (TFLite's bias), else float;
        None without a bias."""
        inner = self.layer
        if not inner.use_bias:
            return None
        scales = (self.kernel_scales() if self.int8_storage and self.batchnorm is None
                  else None)
        if scales is None or self.quantize_config.input_quantizer is None:
            return inner.bias
        step = keras.ops.convert_to_tensor(self._input_vars["step"])
        return int8_storage.on_grid(inner.bias, step * scales)

    def call(self, inputs, training=None):
        q = self.quantize_config.input_quantizer
        x = inputs if q is None else q(inputs, self._input_vars)
        inner = self.layer
        kernel = self.quantized_kernel()
        if isinstance(inner, keras.layers.Dense):
            y = keras.ops.matmul(x, kernel)
        elif isinstance(inner, keras.layers.DepthwiseConv2D):
            y = keras.ops.depthwise_conv(x, kernel, strides=inner.strides, padding=inner.padding,
                                         dilation_rate=inner.dilation_rate,
                                         data_format=inner.data_format)
        else:
            y = inner.convolution_op(x, kernel)
        if getattr(inner, "data_format", "channels_last") == "channels_first":
            raise ValueError(f"layer {inner.name!r}: channels_first is not supported")
        if self.batchnorm is not None:
            return self._folded_batchnorm(y, training)
        if inner.use_bias:
            y = keras.ops.add(y, self.quantized_bias())
        if inner.activation is not None:
            y = inner.activation(y)
        return y

    def batchnorm_factor(self):
        """`(f, offset)` of the inference-mode BatchNorm, `BN(y) = y * f + offset`."""
        bn = self.batchnorm
        mean = keras.ops.convert_to_tensor(bn.moving_mean)
        f = keras.ops.rsqrt(keras.ops.convert_to_tensor(bn.moving_variance) + bn.epsilon)
        if bn.gamma is not None:
            f = f * bn.gamma
        offset = -mean * f
        if bn.beta is not None:
            offset = offset + bn.beta
        return f, offset

    def folded_bias(self):
        """The bias after folding `batchnorm` (inference statistics): `b * f + offset`, on the
        int32 grid of input step times kernel scale times `|f|` with `int8_storage`."""
        f, offset = self.batchnorm_factor()
        if self.layer.use_bias:
            offset = offset + self.layer.bias * f
        scales = self.kernel_scales() if self.int8_storage else None
        if scales is not None and self.quantize_config.input_quantizer is not None:
            step = keras.ops.convert_to_tensor(self._input_vars["step"])
            offset = int8_storage.on_grid(offset, step * scales * keras.ops.abs(f))
        return offset

    def _folded_batchnorm(self, y, training):
        inner, bn = self.layer, self.batchnorm
        if training and bn.trainable:
            if inner.use_bias:
                y = keras.ops.add(y, inner.bias)
            return bn(y, training=True)
        f, _ = self.batchnorm_factor()
        return y * keras.ops.cast(f, y.dtype) + keras.ops.cast(self.folded_bias(), y.dtype)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["quantize_config"] = keras.saving.serialize_keras_object(self.quantize_config)
        config["int8_storage"] = self.int8_storage
        if self.batchnorm is not None:
            config["batchnorm"] = keras.saving.serialize_keras_object(self.batchnorm)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"),
                                                      custom_objects=custom_objects)
        quantize_config = keras.saving.deserialize_keras_object(config.pop("quantize_config"))
        if config.get("batchnorm") is not None:
            config["batchnorm"] = keras.saving.deserialize_keras_object(config["batchnorm"])
        return cls(layer, quantize_config, **config)


def quantize_wrappers(model):
    """Every `QuantizeWrapper` of `model` (nested models included), in layer order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, QuantizeWrapper)]


def scale_variables(model):
    """The learnable quantizer steps of a quantized model, one per quantized tensor.

    The trainer treats these apart from every other trainable variable (the weights theta).
    """
    return [v for w in quantize_wrappers(model) for v in w.scale_variables]


def _input_tensors(layer):
    node = layer._inbound_nodes[0]
    return list(node.input_tensors)


def _producer(tensor):
    return tensor._keras_history.operation


def _is_nonnegative(tensor, _depth=0):
    """True where the graph proves `tensor >= 0` (ReLU-like producer, maybe through pooling)."""
    layer = _producer(tensor)
    if _depth > 64 or isinstance(layer, keras.layers.InputLayer):
        return False
    bounds = activations.bounds(layer)
    if bounds is not None and activations.of_layer(layer) != "linear":
        return bounds[0] >= 0.0
    if isinstance(layer, _PASSTHROUGH_TYPES):
        return _is_nonnegative(_input_tensors(layer)[0], _depth + 1)
    if isinstance(layer, _ALL_INPUTS_TYPES):
        return all(_is_nonnegative(t, _depth + 1) for t in _input_tensors(layer))
    return False


def _logits_conv(model):
    """The conv whose output reaches the model output through reshapes and activations only,
    or None."""
    if len(model.outputs) != 1:
        return None
    layer = _producer(model.outputs[0])
    while isinstance(layer, _SHAPE_TYPES):
        layer = _producer(_input_tensors(layer)[0])
    return layer.name if type(layer) in (keras.layers.Conv2D,) else None


def _check_model(model):
    from keras.src.models.functional import Functional

    if not isinstance(model, keras.Model) or not isinstance(model, (Functional, keras.Sequential)):
        raise ValueError(
            f"quantize_model needs a functional or Sequential Keras 3 model, got "
            f"{type(model).__name__}; rebuild a subclassed model with the functional API")
    if not model.built:
        raise ValueError("quantize_model needs a built model (call it on an input first)")


def _override_spec(spec, name):
    if isinstance(spec, qc.QuantizeConfig):
        return {"config": spec}
    if isinstance(spec, str):
        return {"policy": spec}
    if isinstance(spec, dict):
        unknown = set(spec) - {"policy", "weight_bits", "activation_bits"}
        if unknown:
            raise ValueError(f"override {name!r}: unknown keys {sorted(unknown)}")
        return dict(spec)
    raise ValueError(f"override {name!r}: expected a policy name, a dict or a QuantizeConfig, "
                     f"got {type(spec).__name__}")


def _filter_predicate(filters):
    """`filters` (as Keras's `Model.quantize` takes them) as a predicate on layers, and the
    text that names it in errors."""
    if isinstance(filters, (str, list, tuple)):
        patterns = [filters] if isinstance(filters, str) else list(filters)
        if not patterns or not all(isinstance(f, str) for f in patterns):
            raise ValueError(f"filters must be a regex string, a non-empty list of regex "
                             f"strings or a callable, got {filters!r}")
        try:
            regexes = [re.compile(f) for f in patterns]
        except re.error as e:
            raise ValueError(f"filters regex {e.pattern!r} is invalid: {e}") from None
        return (lambda layer: any(r.search(layer.name) for r in regexes)), f"filters {filters!r}"
    if callable(filters):
        name = getattr(filters, "__qualname__", type(filters).__name__)
        return (lambda layer: bool(filters(layer))), f"filters callable {name}"
    raise ValueError(f"filters must be a regex string, a list of regex strings or a callable, "
                     f"got {type(filters).__name__}")


def layer_policies(model, overrides=None, filters=None):
    """Default policy per quantizable layer, regex overrides on layer names, then `filters`.

    Args:
      model: a built functional or Sequential model.
      overrides: optional dict `{regex: spec}`; the regex must fully match a layer name; spec is
        a policy name ("full", "input_only", "float"), a dict with any of `policy`,
        `weight_bits`, `activation_bits`, or a `QuantizeConfig`.
      filters: optional choice of the layers that quantize at all, as Keras's
        `Model.quantize(filters=...)`: a regex (searched in the layer name), a list of regexes
        (any one found), or a callable `layer -> bool`. A layer left out stays float, whatever
        `overrides` say. A filter that selects no quantizable layer is refused.

    Returns:
      `(specs, unsupported)`: dict layer name -> spec dict, and names of layers with weights
      that stay float because their type is not supported.
    """
    layers = [l for l in model.layers if type(l) in QUANTIZABLE_TYPES]
    convs = [l for l in layers if isinstance(l, _CONV_TYPES)]
    denses = [l for l in layers if isinstance(l, keras.layers.Dense)]
    first_conv = convs[0].name if convs else None
    classifier = denses[-1].name if denses else _logits_conv(model)
    specs = {}
    for layer in layers:
        policy = ("input_only" if layer.name == first_conv else
                  "float" if layer.name == classifier else "full")
        specs[layer.name] = {"policy": policy}
    for pattern, spec in (overrides or {}).items():
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"override regex {pattern!r} is invalid: {e}") from None
        matched = [name for name in specs if regex.fullmatch(name)]
        if not matched:
            raise ValueError(f"override regex {pattern!r} matches no quantizable layer; "
                             f"layers: {sorted(specs)}")
        for name in matched:
            specs[name] = {**specs[name], **_override_spec(spec, pattern)}
    if filters is not None:
        keep, described = _filter_predicate(filters)
        chosen = {l.name for l in layers if keep(l)}
        if not chosen:
            raise ValueError(f"{described} selects no quantizable layer; "
                             f"layers: {sorted(specs)}")
        specs = {name: spec if name in chosen else {"policy": "float"}
                 for name, spec in specs.items()}
    unsupported = [l.name for l in model.layers
                   if type(l) not in QUANTIZABLE_TYPES and l.weights
                   and not isinstance(l, int8_activations.AFFINE_TYPES + (
                       keras.layers.GroupNormalization, keras.layers.LayerNormalization))]
    return specs, unsupported


def init_steps(wrapper):
    """Data-free step initialisation: LSQ's `2 mean|w| / sqrt(u)` for the kernel (per channel
    where the step is), and a `[0, ACT_STEP_INIT_RANGE)` clip range for the input. Use
    `calibrate_scales` for the MSE initialisation on data."""
    cfg = wrapper.quantize_config
    if cfg.weight_quantizer is not None:
        q = cfg.weight_quantizer
        kernel = np.abs(keras.ops.convert_to_numpy(wrapper.kernel_view()))
        axes = tuple(range(kernel.ndim - 1)) if q.per_channel else None
        step = 2.0 * kernel.mean(axis=axes) / np.sqrt(q.qrange[1])
        wrapper.weight_variables["step"].assign(
            np.maximum(step, defaults.STEP_FLOOR).astype("float32"))
    if cfg.input_quantizer is not None:
        wrapper.input_variables["step"].assign(
            defaults.ACT_STEP_INIT_RANGE / cfg.input_quantizer.qrange[1])


def quantize_model(model, *, weight_bits, activation_bits, quantizer=defaults.QUANTIZER,
                   per_channel=defaults.PER_CHANNEL, overrides=None, filters=None,
                   act_grad_count=defaults.ACT_GRAD_COUNT,
                   weight_grad_count=defaults.WEIGHT_GRAD_COUNT, quantizer_kwargs=None):
    """Returns a fake-quantized copy of `model` for QAT; `model` itself is not modified.

    Args:
      model: a built functional or Sequential Keras 3 model.
      weight_bits, activation_bits: bit widths, 2..8.
      quantizer: "lsq" or "ewgs".
      per_channel: per-channel kernel steps (last kernel axis).
      overrides: `{layer-name regex: spec}`, see `layer_policies`.
      filters: the layers that quantize at all (a regex, a list of regexes or a callable
        `layer -> bool`, as Keras's `Model.quantize`); the others stay float. See
        `layer_policies`.
      act_grad_count: "per_example" (default) or "per_batch": LSQ's N for activation steps.
      weight_grad_count: "per_tensor" (default) or "per_channel": LSQ's N for kernel steps.
      quantizer_kwargs: extra quantizer arguments, e.g. `{"delta": 1e-3}` for EWGS.

    Returns:
      A new Keras model with the same layer names (and the activations `fqat_tf.flatten`
      moves into layers of their own), weights copied, steps initialised data-free.
    """
    _check_model(model)
    model = flatten_model(model)
    quant_ops.check_bits(weight_bits, "weight_bits")
    quant_ops.check_bits(activation_bits, "activation_bits")
    if act_grad_count not in ("per_example", "per_batch"):
        raise ValueError(f"act_grad_count must be 'per_example' or 'per_batch', "
                         f"got {act_grad_count!r}")
    specs, unsupported = layer_policies(model, overrides, filters)
    configs = {}
    for name, spec in specs.items():
        if "config" in spec:
            configs[name] = spec["config"]
            continue
        layer = model.get_layer(name)
        configs[name] = qc.make_config(
            spec["policy"], quantizer=quantizer,
            weight_bits=spec.get("weight_bits", weight_bits),
            activation_bits=spec.get("activation_bits", activation_bits),
            per_channel=per_channel,
            input_signed=not _is_nonnegative(_input_tensors(layer)[0]),
            weight_grad_count=weight_grad_count, act_grad_count=act_grad_count,
            quantizer_kwargs=quantizer_kwargs)

    def clone(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        if layer.name in configs:
            return QuantizeWrapper(fresh, configs[layer.name], name=layer.name)
        return fresh

    qmodel = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        new = qmodel.get_layer(layer.name)
        (new.layer if isinstance(new, QuantizeWrapper) else new).set_weights(layer.get_weights())
    for wrapper in quantize_wrappers(qmodel):
        init_steps(wrapper)
    counts = {}
    for cfg in configs.values():
        kind = type(cfg).__name__
        counts[kind] = counts.get(kind, 0) + 1
    log.info("quantize_model: W%d A%d %s, %s", weight_bits, activation_bits, quantizer, counts)
    if unsupported:
        log.info("quantize_model: left float (unsupported layer types): %s", unsupported)
    return qmodel
