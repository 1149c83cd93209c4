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

from fqat_tf import activations, int8_activations, int8_storage, layer_types
from fqat_tf.affine import affine_parameters
from fqat_tf.storage import Fixed, kinds
from fqat_tf.storage.kinds import activation_name, inner_layer


def _activate(layer, y):
    name = activation_name(layer)
    return tf.nn.relu(y) if name == "relu" else tf.nn.relu6(y) if name == "relu6" else y


def constants(layer, input_shapes):
    """Float parameters an emitter needs, read eagerly (they become graph constants)."""
    if isinstance(layer, keras.layers.GroupNormalization):
        return {name: keras.ops.convert_to_numpy(v).astype(np.float64)
                for name, v in (("gamma", layer.gamma), ("beta", layer.beta)) if v is not None}
    if kinds.is_affine(layer):
        inner = layer.layer if isinstance(layer, int8_activations.Int8Affine) else layer
        affine = affine_parameters(inner, int(input_shapes[0][-1]))
        return dict(zip(("f", "offset"), (keras.ops.convert_to_numpy(v) for v in affine)))
    return {}


def as_4d(x):
    """`x` as an NHWC tensor (a `[batch, channels]` one as `[batch, 1, 1, channels]`), and the
    function that restores its shape."""
    shape = x.shape
    if len(shape) == 4:
        return x, lambda y: y
    return (tf.reshape(x, [-1, 1, 1, int(shape[-1])]),
            lambda y: tf.reshape(y, [-1] + [int(d) for d in shape[1:]]))


def _multiply_add(x, em, f, offset):
    """`x * f + offset` per channel as one depthwise conv (int8 weights, int32 bias)."""
    y, restore = as_4d(x)
    y = tf.nn.depthwise_conv2d(y, em.affine_kernel(f), [1, 1, 1, 1], "VALID")
    return restore(y + tf.constant(np.asarray(offset, np.float32)))


def weighted(layer, inputs, em, weights):
    """Conv2D, DepthwiseConv2D or Dense (wrapped or not) with prepared (folded) weights."""
    x = inputs[0]
    inner = inner_layer(layer)
    kernel = em.kernel(weights, layer.name)
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


def activation(layer, inputs, em, consts):
    """An Activation, ReLU or `Int8Activation` layer, its input quantized already.

    Observe mode runs the Keras layer (an `Int8Activation` computes TFLite's integers there);
    the other modes emit the ops the converter turns into the TFLite kernel. The graph puts
    the output on its grid.
    """
    x = inputs[0]
    act = kinds.activation_of(layer)
    if act is None:         # a ReLU capped at another value than 6
        return tf.minimum(tf.nn.relu(x), float(layer.max_value))
    if act.fused:
        return {"linear": x, "relu": tf.nn.relu(x), "relu6": tf.nn.relu6(x)}[act.name]
    if em.mode == "observe":
        return layer(x, training=False)
    if act.name == "hard_sigmoid":
        f, offset = int8_activations.HARD_SIGMOID_AFFINE
        if em.mode == "float":
            return tf.nn.relu6(x + 3.0) * f
        channels = int(x.shape[-1])
        return _multiply_add(x, em, np.full(channels, f), np.full(channels, offset))
    if act.name == "hard_silu":
        # The pattern the converter turns into HARD_SWISH.
        return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)
    if act.name == "silu":
        # LOGISTIC on its fixed grid, then MUL.
        return x * em.fixed(tf.sigmoid(x), Fixed(*activations.get("sigmoid").output_range))
    return {"sigmoid": tf.sigmoid, "tanh": tf.tanh,
            "softmax": lambda v: tf.nn.softmax(v, axis=-1)}[act.name](x)


def affine(layer, inputs, em, consts):
    """A BatchNormalization (not folded), Rescaling or Normalization, or its `Int8Affine`:
    a depthwise multiply-add in the integer model (`int8_activations.int8_affine`)."""
    if em.mode == "observe":
        return layer(inputs[0], training=False)
    if em.mode == "float":
        return inputs[0] * consts["f"] + consts["offset"]
    return _multiply_add(inputs[0], em, consts["f"], consts["offset"])


def multiply(layer, inputs, em, consts):
    return inputs[0] * inputs[1]


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
    (keras.layers.ReLU, activation),
    (keras.layers.Activation, activation),
    (int8_activations.Int8Activation, activation),
    (layer_types.AFFINE_TYPES + (int8_activations.Int8Affine,), affine),
    (keras.layers.Add, add),
    (keras.layers.Multiply, multiply),
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
