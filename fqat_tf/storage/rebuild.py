"""A fake-quant model rebuilt to train with the 8-bit storage of its integer model.

    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    qmodel = fqat_tf.storage.int8_storage_model(qmodel)
    fqat_tf.calibrate_scales(qmodel, batches)
    fqat_tf.calibrate_ranges(qmodel, batches)
    ... QAT ...; export.tflite.export(qmodel, batches) then agrees with it up to rounding ties.

A layer that reads its input as stored (`quantize_model(shared_inputs="stored")`) rounds its
bias on the grid of the range it reads, which another layer keeps: `sync_input_scales` copies
that range's scale into it (`calibrate_ranges` does so; call it again after training with
ranges that move, i.e. BatchNorm in training mode).

The `StoragePlan` decides which tensors the integer model stores on a range of their own
(representation "range"); this module puts a `fqat_tf.RangeQuantize` behind each of them,
replaces every GroupNormalization by an `Int8GroupNormalization` (its int8 lowering, simulated),
every activation with an int8 kernel of its own (sigmoid, softmax, tanh, hard-sigmoid,
hard-swish, swish) by an `Int8Activation` and every other per-channel affine layer (a
BatchNormalization that follows no conv, a Rescaling, a Normalization) by an `Int8Affine`,
moves every BatchNorm the plan folds into its conv's wrapper (`QuantizeWrapper(batchnorm=)`,
which rounds the folded bias as TFLite does) and rounds the kernels the recipe leaves float
(the first conv, the classifier) onto their int8 grids and their biases onto TFLite's int32
grids (`QuantizeWrapper(int8_storage=True)`). Learned quantizers, steps and weights are copied.
See `fqat_tf.int8_storage` for why.
"""
import keras

from fqat_tf import defaults, layer_types
from fqat_tf.int8_activations import Int8Activation, Int8Affine
from fqat_tf.int8_storage import Int8GroupNormalization, RangeQuantize, storage_layers
from fqat_tf.wrapper import QuantizeWrapper
from fqat_tf.storage import kinds
from fqat_tf.storage.plan import INPUT_KEY, StoragePlan

SUFFIX = "_int8"


def _fresh(layer, ema_decay, batchnorm=None):
    config = layer.get_config()
    if isinstance(layer, QuantizeWrapper):
        config["int8_storage"] = True
        if batchnorm is not None:
            config["batchnorm"] = keras.saving.serialize_keras_object(batchnorm)
        return QuantizeWrapper.from_config(config)
    if type(layer) is keras.layers.GroupNormalization:
        return Int8GroupNormalization(ema_decay=ema_decay, **config)
    act = kinds.activation_of(layer)
    if act is not None and (act.output_range or act.own_output or act.name == "silu"):
        return Int8Activation(act.name, ema_decay=ema_decay, name=layer.name)
    if isinstance(layer, layer_types.AFFINE_TYPES):
        return Int8Affine(layer.__class__.from_config(config), ema_decay=ema_decay)
    return layer.__class__.from_config(config)


def _copy_weights(old, new, batchnorm=None):
    if isinstance(new, Int8GroupNormalization):
        for target, source in zip(new.weights, old.weights):   # gamma, beta come first
            target.assign(source)
    elif isinstance(new, Int8Affine):
        new.layer.set_weights(old.get_weights())
    elif isinstance(new, QuantizeWrapper):
        new.layer.set_weights(old.layer.get_weights())
        for role in ("weight_variables", "input_variables"):
            for key, v in (getattr(old, role) or {}).items():
                getattr(new, role)[key].assign(v)
        if batchnorm is not None:
            new.batchnorm.set_weights(batchnorm.get_weights())
    elif not isinstance(new, Int8Activation):       # an activation has only its new ranges
        new.set_weights(old.get_weights())


def int8_storage_model(model, *, ema_decay=defaults.INT8_RANGE_EMA_DECAY):
    """A copy of `model` that fake-quantizes every tensor its integer model stores in 8 bits.

    Args:
      model: a functional or Sequential fake-quant model (`fqat_tf.quantize_model`) made of
        layers the integer model keeps integer.
      ema_decay: moving-average decay of the new ranges in training.

    Returns:
      A new functional model; its ranges are uncalibrated (identity) until
      `fqat_tf.calibrate_ranges` or the first training step.

    Raises:
      fqat_tf.storage.UnsupportedLayerError: a layer has no integer lowering.
      ValueError: `model` has int8 storage already.
    """
    if storage_layers(model):
        raise ValueError(f"model {model.name!r} has int8 storage layers already")
    plan = StoragePlan(model)
    names = {layer.name for layer in plan.model.layers}

    def stored(tensor, key):
        name = (key if key != INPUT_KEY else "input") + SUFFIX
        if name in names:
            raise ValueError(f"cannot add layer {name!r}: the model has a layer of that name")
        return RangeQuantize(ema_decay=ema_decay, name=name)(tensor)

    # A BatchNorm the plan folds into a quantized conv moves into that conv's wrapper, which
    # then rounds the folded bias as the integer model does.
    folds = {conv: bn for conv, bn in plan.folds.items()
             if isinstance(plan.model.get_layer(conv), QuantizeWrapper)}
    folded = {bn.name for bn in folds.values()}
    source = plan.model.inputs[0]
    x = keras.Input(shape=tuple(source.shape[1:]), name=source._keras_history.operation.name)
    # A layer that stores its input on a range of its own reads the tensor before any
    # RangeQuantize: both then see the same values and keep the same range.
    raw = {INPUT_KEY: x}
    tensors = {INPUT_KEY: stored(x, INPUT_KEY) if plan.rep[INPUT_KEY] == "range" else x}
    for node in plan.nodes:
        old = node.layer
        if old.name in folded:
            y = tensors[node.inputs[0]]
        else:
            bn = folds.get(old.name)
            layer = _fresh(old, ema_decay, bn)
            source = raw if kinds.stores_input(layer) else tensors
            args = [source[k] for k in node.inputs]
            y = layer(args[0] if len(args) == 1 else args)
            _copy_weights(old, layer, bn)
        raw[node.output] = y
        own = kinds.fixed_output_range(layer) or kinds.owns_output_range(layer)
        needs_range = plan.rep[node.output] == "range" and not own
        tensors[node.output] = stored(y, node.output) if needs_range else y
    return keras.Model(x, tensors[plan.output_key], name=model.name)


def sync_input_scales(model):
    """Gives every layer that reads its input as stored (`QuantizeWrapper.reads_stored_input`)
    the scale of the range it reads, so that its bias sits on TFLite's int32 grid.

    Args:
      model: an int8 storage model (`int8_storage_model`) with its ranges set.

    Returns:
      `{layer name: scale}`.

    Raises:
      ValueError: a range the layers read was never set.
    """
    plan = StoragePlan(model)
    scales = plan.stored_input_scales()
    for name, scale in scales.items():
        plan.model.get_layer(name).input_storage_scale.assign(scale)
    return scales
