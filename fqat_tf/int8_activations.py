"""Activations and per-channel affine layers with their int8 TFLite kernels simulated.

An int8 model runs a sigmoid, a softmax or a hard-swish on int8 integers: the kernel's input is
an 8-bit tensor and its output lands on a grid the kernel fixes (LOGISTIC, SOFTMAX, TANH) or
computes in fixed point from the output scale (HARD_SWISH). A BatchNormalization that follows no
convolution, a Rescaling or a Normalization is a depthwise multiply-add there: per-channel int8
weights `f` (exact: the scale is `|f| / 127`) and an int32 bias on the grid of input scale
times weight scale. The layers here keep an 8-bit range of their input (and of the output,
where the kernel needs its scale) and compute what those kernels compute
(`fqat_tf.int8_kernels`), so that a model trained with them (`fqat_tf.storage`) is the integer
model. An uncalibrated layer computes the plain float function.
"""
import keras
import tensorflow as tf

from fqat_tf import activations, defaults, int8_kernels
from fqat_tf.affine import affine_parameters
from fqat_tf.int8_storage import StorageLayerMixin, abs_max_scales
from fqat_tf.layer_types import AFFINE_TYPES

# hard_sigmoid(x) = clip(x / 6 + 1/2, 0, 1): a depthwise multiply-add whose int8 output on
# [0, 1] saturates where the clip does.
HARD_SIGMOID_AFFINE = (1.0 / 6.0, 0.5)


def affine_weight_scales(f):
    """Per-channel int8 weight scales of a depthwise multiply by `f` (`[channels]`)."""
    return abs_max_scales(tf.reshape(f, [1, -1]))


def int8_affine(x, f, offset, input_range):
    """`x * f + offset` as TFLite's int8 depthwise multiply-add computes it before requantizing
    its output: the weights are `f` on their per-channel int8 grid, the bias `offset` on the
    int32 grid of input scale times weight scale.

    Args:
      x: values on the int8 grid of the FakeQuant range `input_range` (float32).
      f, offset: float32 `[channels]` (the last axis of `x`).
    """
    scales = tf.stop_gradient(affine_weight_scales(f))
    weights = f + tf.stop_gradient(tf.round(f / scales) * scales - f)
    return x * weights + int8_kernels.bias_on_grid(
        offset, int8_kernels.range_scale(*input_range), scales)


@keras.saving.register_keras_serializable(package="fqat_tf")
class Int8Activation(StorageLayerMixin, keras.layers.Layer):
    """An activation as TFLite's int8 kernel computes it, on an 8-bit range of its input.

    Args:
      activation: one of "sigmoid", "softmax", "tanh", "hard_sigmoid", "hard_silu", "silu"
        (Keras's names; aliases such as "hard_swish" are accepted).
      ema_decay: decay of the moving average of the batch extremes in training.

    The output is on the kernel's fixed grid (sigmoid, softmax, tanh, hard_sigmoid), on an
    8-bit output range of the layer's own (hard_silu) or float (silu: `x * sigmoid(x)` with the
    sigmoid on its fixed grid; the reader's storage quantizes the product).
    """

    def __init__(self, activation, ema_decay=defaults.INT8_RANGE_EMA_DECAY, **kwargs):
        super().__init__(**kwargs)
        name = activations.function_name(activation)
        if name not in INT8_ACTIVATIONS:
            raise ValueError(f"Int8Activation {self.name!r}: no int8 kernel for activation "
                             f"{activation!r}; supported: {sorted(INT8_ACTIVATIONS)}")
        self.activation = name
        self._set_decay(ema_decay)

    @property
    def kind(self):
        """The `fqat_tf.activations.Activation` this layer computes."""
        return activations.get(self.activation)

    def build(self, input_shape):
        self._build_ranges(["input", "output"] if self.kind.own_output else ["input"])
        self.built = True

    def call(self, inputs, training=None):
        mode = self._mode(training)
        x = tf.cast(inputs, tf.float32)
        active = self._observe("input", x, mode)
        xq = self._ranges["input"].quantize(x, active)
        y = INT8_ACTIVATIONS[self.activation](self, xq, mode)
        self._mark_initialized(mode)
        plain = keras.activations.get(self.activation)(x)
        return tf.cast(tf.where(active, y, plain), inputs.dtype)

    def _fixed(self, y):
        return int8_kernels.on_range(y, self.kind.output_range)

    def _hard_sigmoid(self, x, mode):
        f, offset = (tf.fill([tf.shape(x)[-1]], v) for v in HARD_SIGMOID_AFFINE)
        return self._fixed(int8_affine(x, f, offset, self._range("input")))

    def _hard_silu(self, x, mode):
        exact = x * tf.nn.relu6(x + 3.0) / 6.0
        self._observe("output", exact, mode)
        return int8_kernels.hard_swish(x, self._range("input"), self._range("output"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "activation": self.activation,
                "ema_decay": self.ema_decay}


INT8_ACTIVATIONS = {
    "sigmoid": lambda layer, x, mode: layer._fixed(tf.sigmoid(x)),
    "tanh": lambda layer, x, mode: layer._fixed(tf.tanh(x)),
    "softmax": lambda layer, x, mode: layer._fixed(tf.nn.softmax(x, axis=-1)),
    "hard_sigmoid": Int8Activation._hard_sigmoid,
    "hard_silu": Int8Activation._hard_silu,
    "silu": lambda layer, x, mode: x * int8_kernels.on_range(
        tf.sigmoid(x), activations.get("sigmoid").output_range),
}


@keras.saving.register_keras_serializable(package="fqat_tf")
class Int8Affine(StorageLayerMixin, keras.layers.Wrapper):
    """A BatchNormalization, Rescaling or Normalization as TFLite's int8 depthwise multiply-add.

    Args:
      layer: the affine layer (normalising the last axis), whose variables stay its own.
      ema_decay: decay of the moving average of the batch extremes in training.

    A BatchNormalization trained in training mode normalises with batch statistics, as a
    plain one does.
    """

    def __init__(self, layer, ema_decay=defaults.INT8_RANGE_EMA_DECAY, **kwargs):
        if not isinstance(layer, AFFINE_TYPES):
            raise ValueError(f"Int8Affine cannot wrap {type(layer).__name__} "
                             f"(layer {layer.name!r}); supported: "
                             f"{[t.__name__ for t in AFFINE_TYPES]}")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self._set_decay(ema_decay)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_ranges(["input"])
        self.built = True

    def affine(self, channels):
        """`(f, offset)` of the wrapped layer with inference statistics (`affine_parameters`)."""
        return affine_parameters(self.layer, channels)

    def call(self, inputs, training=None):
        mode = self._mode(training)
        x = tf.cast(inputs, tf.float32)
        active = self._observe("input", x, mode)
        xq = self._ranges["input"].quantize(x, active)
        self._mark_initialized(mode)
        layer = self.layer
        if training and isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            return tf.cast(layer(xq, training=True), inputs.dtype)
        f, offset = self.affine(int(x.shape[-1]))
        y = tf.where(active, int8_affine(xq, f, offset, self._range("input")), x * f + offset)
        return tf.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay}
