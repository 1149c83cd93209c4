"""`quantize_model`: wrap every conv and dense of a Keras 3 model in a `QuantizeWrapper`.

The default policy (docs/algorithm.md §1): the first conv quantizes only its input (signed), the
classifier stays float, every other Conv2D / DepthwiseConv2D / Dense quantizes its kernel
(signed) and its input. The classifier is the last Dense, or in a network without one the conv
that makes the logits (its output reaches the model output through reshapes and activations
only, as in MobileNetV3). An input is quantized unsigned only where the graph proves it is
non-negative (it comes from a ReLU, ReLU6, sigmoid, hard-sigmoid or softmax, possibly through
pooling, padding or an add or product of such tensors; `fqat_tf.activations` holds the
bounds); otherwise it is signed, so GroupNorm outputs, hard-swish outputs or normalised images
are never clipped at zero. The model is first flattened (`fqat_tf.flatten`): nested models
inlined, activations TFLite cannot fuse moved out of convs into layers of their own.

`shared_inputs="stored"` changes the policy of a conv or dense whose input other layers read
too (a residual block's input, read by the shortcut): it quantizes its kernel only and reads
the tensor as the integer model stores it, on the 8-bit range the shortcut needs anyway
(docs/algorithm.md §1). The integer model then has no requantizing op there, and such layers
see 8-bit inputs instead of b-bit ones.
"""
import logging
import re

import keras
import numpy as np

from fqat_tf import activations, defaults, layer_types, quant_ops
from fqat_tf import quantize_configs as qc
from fqat_tf.flatten import flatten_model
from fqat_tf.wrapper import QuantizeWrapper, quantize_wrappers, scale_variables

__all__ = ["QuantizeWrapper", "init_steps", "layer_policies", "quantize_model",
           "quantize_wrappers", "scale_variables"]

log = logging.getLogger(__name__)


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
    if isinstance(layer, layer_types.SIGN_PRESERVING_TYPES):
        return _is_nonnegative(_input_tensors(layer)[0], _depth + 1)
    if isinstance(layer, layer_types.SIGN_PRESERVING_MERGE_TYPES):
        return all(_is_nonnegative(t, _depth + 1) for t in _input_tensors(layer))
    return False


def _logits_conv(model):
    """The conv whose output reaches the model output through reshapes and activations only,
    or None."""
    if len(model.outputs) != 1:
        return None
    layer = _producer(model.outputs[0])
    while isinstance(layer, layer_types.SHAPE_TYPES):
        layer = _producer(_input_tensors(layer)[0])
    return layer.name if type(layer) in (keras.layers.Conv2D,) else None


def _check_model(model):
    if not (layer_types.is_functional(model) or isinstance(model, keras.Sequential)):
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


SHARED_INPUTS = ("learned", "stored")


def _shared_input_layers(model):
    """Names of the layers whose input, followed up through passthrough layers read by them
    alone, is read by another layer call too or is the model output."""
    view = layer_types.functional_view(model, "quantize_model")
    readers = {id(t): 1 for t in view.outputs}
    calls = []
    for depth in sorted(view._nodes_by_depth, reverse=True):
        for node in view._nodes_by_depth[depth]:
            if node.is_input or isinstance(node.operation, keras.layers.InputLayer):
                continue
            calls.append((node.operation, list(node.input_tensors)))
            for t in node.input_tensors:
                readers[id(t)] = readers.get(id(t), 0) + 1
    shared = set()
    for layer, inputs in calls:
        if not inputs:
            continue
        t = inputs[0]
        while isinstance(_producer(t), layer_types.PASSTHROUGH_TYPES) and readers[id(t)] == 1:
            t = _input_tensors(_producer(t))[0]
        if readers[id(t)] > 1:
            shared.add(layer.name)
    return shared


def layer_policies(model, overrides=None, filters=None,
                   shared_inputs=defaults.SHARED_INPUTS):
    """Default policy per quantizable layer, regex overrides on layer names, then `filters`.

    Args:
      model: a built functional or Sequential model.
      overrides: optional dict `{regex: spec}`; the regex must fully match a layer name; spec is
        a policy name ("full", "input_only", "weight_only", "float"), a dict with any of
        `policy`, `weight_bits`, `activation_bits`, or a `QuantizeConfig`.
      filters: optional choice of the layers that quantize at all, as Keras's
        `Model.quantize(filters=...)`: a regex (searched in the layer name), a list of regexes
        (any one found), or a callable `layer -> bool`. A layer left out stays float, whatever
        `overrides` say. A filter that selects no quantizable layer is refused.
      shared_inputs: "learned" (the paper) or "stored": a "full" layer whose input other
        layers read too becomes "weight_only" (module docstring). Overrides come after it.

    Returns:
      `(specs, unsupported)`: dict layer name -> spec dict, and names of layers with weights
      that stay float because their type is not supported.
    """
    layers = [l for l in model.layers if layer_types.is_weighted(l)]
    convs = [l for l in layers if layer_types.is_conv(l)]
    denses = [l for l in layers if isinstance(l, keras.layers.Dense)]
    first_conv = convs[0].name if convs else None
    classifier = denses[-1].name if denses else _logits_conv(model)
    if shared_inputs not in SHARED_INPUTS:
        raise ValueError(f"shared_inputs must be one of {SHARED_INPUTS}, got {shared_inputs!r}")
    shared = _shared_input_layers(model) if shared_inputs == "stored" else set()
    specs = {}
    for layer in layers:
        policy = ("input_only" if layer.name == first_conv else
                  "float" if layer.name == classifier else
                  "weight_only" if layer.name in shared else "full")
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
                   if not layer_types.is_weighted(l) and l.weights
                   and not isinstance(l, layer_types.AFFINE_TYPES + (
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
                   weight_grad_count=defaults.WEIGHT_GRAD_COUNT, quantizer_kwargs=None,
                   shared_inputs=defaults.SHARED_INPUTS):
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
      shared_inputs: "learned" (default, the paper) or "stored": a layer whose input other
        layers read too quantizes its kernel only and reads that input on its 8-bit storage
        (module docstring; for integer export with `fqat_tf.storage.int8_storage_model`).

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
    specs, unsupported = layer_policies(model, overrides, filters, shared_inputs)
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
