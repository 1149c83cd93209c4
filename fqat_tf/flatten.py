"""A Keras model rewritten as one flat functional graph of layers `quantize_model` and the
integer model understand.

* Nested functional and Sequential models (a keras.applications backbone inside a model) are
  inlined: their layers become layers of the outer model.
* An activation fused into a Conv2D, DepthwiseConv2D or Dense that TFLite cannot fuse (anything
  but ReLU and ReLU6: a sigmoid gate, a swish, a softmax head) moves into an Activation layer
  of its own, named `<layer>_<activation>`: its input and output are different int8 tensors.
* `ReLU(6)(x + 3) * (1 / 6)` written with operators (keras.applications' MobileNetV3) becomes
  `Activation("hard_sigmoid")`, named after the ReLU.

Layers are copied (config and weights); a model that needs none of this is returned as is.
"""
import keras

from fqat_tf import activations, layer_types

_HARD_SIGMOID_OPS = ("Add", "Multiply")


def _is_model(operation):
    return isinstance(operation, keras.Model)


def _nodes(model):
    for depth in sorted(model._nodes_by_depth, reverse=True):
        yield from model._nodes_by_depth[depth]


def _split_activation(layer):
    """The activation to move out of a conv or dense, or None."""
    if not isinstance(layer, layer_types.WEIGHTED_TYPES):
        return None
    name = activations.function_name(layer.activation)
    act = activations.get(name)
    return None if act is not None and act.fused else name


def _scalar_argument(node):
    args = node.arguments.args
    if len(args) != 2 or node.arguments.kwargs:
        return None
    value = args[1]
    return float(value) if isinstance(value, (int, float)) else None


def _hard_sigmoid_end(node, readers):
    """For the `+ 3` op starting `relu6(x + 3) * (1/6)`: `(relu layer, multiply node)`."""
    if type(node.operation).__name__ != "Add" or _scalar_argument(node) != 3.0:
        return None
    after = readers.get(id(node.outputs[0]), [])
    if len(after) != 1 or activations.of_layer(after[0].operation) != "relu6":
        return None
    scale = readers.get(id(after[0].outputs[0]), [])
    if (len(scale) != 1 or type(scale[0].operation).__name__ != "Multiply"
            or abs((_scalar_argument(scale[0]) or 0.0) * 6.0 - 1.0) > 1e-6):
        return None
    return after[0].operation, scale[0]


def _needs_rewrite(model):
    for node in _nodes(model):
        op = node.operation
        if _is_model(op) or _split_activation(op) is not None:
            return True
        if not isinstance(op, keras.layers.Layer):
            return True
    return False


def _copy(layer, config_changes=None):
    config = {**layer.get_config(), **(config_changes or {})}
    return layer.__class__.from_config(config)


def _rebuild(model, tensors, copied):
    """Calls copies of `model`'s layers on `tensors` (id of the model's tensor -> new tensor);
    returns the new tensors of the model's outputs. `copied`: ids of the layers copied so far
    (a layer called twice shares its weights, which copies would not)."""
    model = layer_types.functional_view(model, "inlining a nested model")
    nodes = list(_nodes(model))
    readers = {}
    for node in nodes:
        for t in node.input_tensors:
            readers.setdefault(id(t), []).append(node)
    skip = set()
    for node in nodes:
        op = node.operation
        if node.is_input or isinstance(op, keras.layers.InputLayer) or id(node) in skip:
            continue
        if _is_model(op):
            inner = layer_types.functional_view(op, "inlining a nested model")
            inner_tensors = {id(a): tensors[id(b)]
                             for a, b in zip(inner.inputs, node.input_tensors)}
            for out, new in zip(node.outputs, _rebuild(inner, inner_tensors, copied)):
                tensors[id(out)] = new
            continue
        end = _hard_sigmoid_end(node, readers)
        if end is not None:
            relu, multiply = end
            skip.update({id(readers[id(node.outputs[0])][0]), id(multiply)})
            x = tensors[id(node.input_tensors[0])]
            tensors[id(multiply.outputs[0])] = keras.layers.Activation(
                "hard_sigmoid", name=relu.name)(x)
            continue
        args, kwargs = node.arguments.fill_in({id(t): tensors[id(t)] for t in node.input_tensors})
        if not isinstance(op, keras.layers.Layer):
            tensors[id(node.outputs[0])] = op(*args, **kwargs)
            continue
        if id(op) in copied:
            raise ValueError(f"layer {op.name!r} is called more than once (shared weights); "
                             f"flatten_model needs one call per layer")
        copied.add(id(op))
        split = _split_activation(op)
        layer = _copy(op, {"activation": "linear"} if split else None)
        y = layer(*args, **kwargs)
        layer.set_weights(op.get_weights())
        if split:
            y = keras.layers.Activation(split, name=f"{op.name}_{split}")(y)
        tensors[id(node.outputs[0])] = y
    return [tensors[id(t)] for t in model.outputs]


def flatten_model(model):
    """A flat functional copy of `model` (module docstring), or `model` if it is flat already.

    Args:
      model: a built functional or Sequential Keras model.

    Returns:
      A functional model with the same inputs, outputs and layer names (plus the moved
      activations), or `model` itself.
    """
    view = layer_types.functional_view(model, "quantize_model")
    if not _needs_rewrite(view):
        return model
    inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype,
                          name=t._keras_history.operation.name) for t in view.inputs]
    tensors = {id(a): b for a, b in zip(view.inputs, inputs)}
    outputs = _rebuild(view, tensors, set())
    return keras.Model(inputs if len(inputs) > 1 else inputs[0],
                       outputs if len(outputs) > 1 else outputs[0], name=model.name)
