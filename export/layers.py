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
from fqat_tf.storage.kinds import activation_name, inner_layer


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
