"""TensorFlow ops for each Keras layer type the exporter keeps integer.

Each emitter takes the layer, its input tensors, the `export.emitter.Emitter` of the build
(it owns the mode and inserts the fake-quant ops) and the layer's float parameters read
beforehand (`constants`); it returns the layer's output before that output's own
quantization, which the graph adds. Only ops with int8 TFLite kernels are used (SQUARE, for
one, has none).
"""
import keras
import numpy as np
import tensorflow as tf

from fqat_tf import int8_storage
from fqat_tf.quantize import QuantizeWrapper

# Layers through which a quantizer can be moved to the input without changing any value:
# quantization is monotone and maps 0 to 0, so it commutes with padding, max pooling and
# reshapes. TFLite runs them with one scale on input and output.
PASSTHROUGH_TYPES = (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D, keras.layers.Flatten,
                     keras.layers.Reshape, keras.layers.Dropout, keras.layers.Identity)
CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
WEIGHTED_TYPES = CONV_TYPES + (keras.layers.Dense,)


def inner_layer(layer):
    """The float layer inside a `QuantizeWrapper`, or the layer itself."""
    return layer.layer if isinstance(layer, QuantizeWrapper) else layer


def activation_name(layer):
    """"linear", "relu" or another name for the activation a layer applies to its output."""
    act = getattr(inner_layer(layer), "activation", None)
    return "linear" if act is None else getattr(act, "__name__", str(act))


def is_plain_relu(layer):
    """A ReLU layer (or relu Activation) that TFLite can fuse into the op before it."""
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None and float(layer.negative_slope) == 0.0
                and float(layer.threshold) == 0.0)
    return isinstance(layer, keras.layers.Activation) and activation_name(layer) == "relu"


def unsupported_reason(layer, input_shapes):
    """Why `layer` (reading tensors of `input_shapes`) cannot be exported integer, or None."""
    inner = inner_layer(layer)
    if type(inner) in WEIGHTED_TYPES:
        if activation_name(layer) not in ("linear", "relu"):
            return f"activation {activation_name(layer)!r} has no int8 kernel here"
        if getattr(inner, "groups", 1) != 1:
            return "grouped convolution"
        if getattr(inner, "data_format", "channels_last") != "channels_last":
            return "channels_first"
        if isinstance(inner, keras.layers.Dense) and len(input_shapes[0]) != 2:
            return "Dense on a tensor of rank > 2"
        return None
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return "leaky or thresholded ReLU"
        return None
    if isinstance(layer, keras.layers.Activation):
        ok = activation_name(layer) in ("linear", "relu")
        return None if ok else f"activation {activation_name(layer)!r} has no int8 kernel here"
    if isinstance(layer, keras.layers.Add):
        return None if len(input_shapes) == 2 else "Add of more than two tensors"
    if isinstance(layer, keras.layers.GroupNormalization):
        axis = layer.axis if layer.axis == -1 else layer.axis - len(input_shapes[0])
        if axis != -1 or len(input_shapes[0]) != 4 or None in input_shapes[0][1:]:
            return "GroupNormalization over a non-channel axis or an unknown spatial size"
        return None
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                          keras.layers.GlobalAveragePooling2D)):
        fmt = getattr(layer, "data_format", "channels_last")
        return None if fmt == "channels_last" else "channels_first"
    if isinstance(layer, PASSTHROUGH_TYPES + (keras.layers.Concatenate,
                                              int8_storage.RangeQuantize)):
        return None
    if isinstance(layer, keras.layers.BatchNormalization):
        return "BatchNormalization that does not directly follow a linear Conv2D/DepthwiseConv2D"
    return f"no integer lowering for {type(layer).__name__}"


def _activate(layer, y):
    return tf.nn.relu(y) if activation_name(layer) == "relu" else y


def constants(layer):
    """Float parameters an emitter needs, read eagerly (they become graph constants)."""
    if isinstance(layer, keras.layers.GroupNormalization):
        return {name: keras.ops.convert_to_numpy(v).astype(np.float64)
                for name, v in (("gamma", layer.gamma), ("beta", layer.beta)) if v is not None}
    return {}


def weighted(layer, inputs, em, weights):
    """Conv2D, DepthwiseConv2D or Dense (wrapped or not) with prepared (folded) weights."""
    x = inputs[0]
    inner = inner_layer(layer)
    kernel = em.kernel(weights)
    if isinstance(inner, keras.layers.Dense):
        if weights.as_conv:
            # Per-channel Dense scales cannot be stored per-tensor; a 1x1 conv keeps them.
            y = tf.nn.conv2d(tf.reshape(x, [-1, 1, 1, x.shape[-1]]), kernel, 1, "VALID")
            y = tf.reshape(y, [-1, kernel.shape[-1]])
        else:
            y = tf.matmul(x, kernel)
    elif isinstance(inner, keras.layers.DepthwiseConv2D):
        y = tf.nn.depthwise_conv2d(x, kernel, (1,) + tuple(inner.strides) + (1,),
                                   inner.padding.upper(), dilations=inner.dilation_rate)
    else:
        y = tf.nn.conv2d(x, kernel, inner.strides, inner.padding.upper(),
                         dilations=inner.dilation_rate)
    if weights.bias is not None:
        y = y + tf.constant(weights.bias.astype(np.float32))
    return _activate(layer, y)


def relu(layer, inputs, em, consts):
    y = tf.nn.relu(inputs[0])
    max_value = getattr(layer, "max_value", None)
    return y if max_value is None else tf.minimum(y, float(max_value))


def activation(layer, inputs, em, consts):
    return _activate(layer, inputs[0])


def add(layer, inputs, em, consts):
    return inputs[0] + inputs[1]


def concatenate(layer, inputs, em, consts):
    return tf.concat(inputs, axis=layer.axis)


def zero_padding(layer, inputs, em, consts):
    (top, bottom), (left, right) = layer.padding
    return tf.pad(inputs[0], [[0, 0], [top, bottom], [left, right], [0, 0]])


def max_pooling(layer, inputs, em, consts):
    return tf.nn.max_pool2d(inputs[0], layer.pool_size, layer.strides, layer.padding.upper())


def average_pooling(layer, inputs, em, consts):
    return tf.nn.avg_pool2d(inputs[0], layer.pool_size, layer.strides, layer.padding.upper())


def global_average_pooling(layer, inputs, em, consts):
    return tf.reduce_mean(inputs[0], axis=[1, 2], keepdims=bool(layer.keepdims))


def flatten(layer, inputs, em, consts):
    x = inputs[0]
    return tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])


def reshape(layer, inputs, em, consts):
    return tf.reshape(inputs[0], [-1] + [int(d) for d in layer.target_shape])


def identity(layer, inputs, em, consts):
    return inputs[0]


def group_normalization(layer, inputs, em, consts):
    """GroupNorm from int8 ops, each intermediate quantized on its own range
    (`fqat_tf.int8_storage.group_norm_ops`). An `Int8GroupNormalization` trained its ranges and
    quantizes its constant operands in the Keras model already; observe mode does as it does."""
    clip = None
    if "output_clip" in consts and em.mode == "observe":
        # The reader clips y at (lo, hi): x * a beyond these bounds, less the offset, gives
        # the same output, so its range need not hold such values.
        clip = consts["output_clip"]
    stored = isinstance(layer, int8_storage.Int8GroupNormalization)
    return int8_storage.group_norm_ops(
        inputs[0], layer.groups, layer.epsilon, consts.get("gamma"), consts.get("beta"),
        lambda part, t, clip=None: em.range(layer.name, part, t, clip=clip),
        lambda values: em.constant(values, always=stored), scaled_clip=clip)


EMITTERS = (
    (keras.layers.ReLU, relu),
    (keras.layers.Activation, activation),
    (keras.layers.Add, add),
    (keras.layers.Concatenate, concatenate),
    (keras.layers.ZeroPadding2D, zero_padding),
    (keras.layers.MaxPooling2D, max_pooling),
    (keras.layers.AveragePooling2D, average_pooling),
    (keras.layers.GlobalAveragePooling2D, global_average_pooling),
    (keras.layers.Flatten, flatten),
    (keras.layers.Reshape, reshape),
    (keras.layers.Dropout, identity),
    (keras.layers.Identity, identity),
    (keras.layers.GroupNormalization, group_normalization),
    (int8_storage.RangeQuantize, identity),
)


def emitter_for(layer):
    """The emitter of a non-weighted layer type, or None."""
    for cls, fn in EMITTERS:
        if isinstance(layer, cls):
            return fn
    return None
