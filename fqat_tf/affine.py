"""Per-channel affine maps of normalisation layers with inference statistics.

`y = x * f + offset` per channel of the last axis: a BatchNormalization (`f = gamma /
sqrt(var + eps)`, `offset = beta - mean * f`), a Rescaling or a Normalization. Training folds a
BatchNorm into its conv with it (`fqat_tf.wrapper`), int8 storage runs the others as a
depthwise multiply-add (`fqat_tf.int8_activations`), and the exporter folds and emits them
(`export.fold`, `export.layers`): all from here.
"""
import keras
import numpy as np


def batchnorm_affine(bn, dtype="float32"):
    """`(f, offset)` of a BatchNormalization with inference statistics, `BN(y) = y * f + offset`.

    Args:
      bn: a built `keras.layers.BatchNormalization`.
      dtype: the dtype the arithmetic runs in ("float64" for the exporter's folding).

    Returns:
      `(f, offset)` tensors of shape `[C]`; gradients reach gamma and beta.
    """
    ops = keras.ops
    f = ops.rsqrt(ops.cast(bn.moving_variance, dtype) + bn.epsilon)
    if bn.gamma is not None:
        f = f * ops.cast(bn.gamma, dtype)
    offset = -ops.cast(bn.moving_mean, dtype) * f
    if bn.beta is not None:
        offset = offset + ops.cast(bn.beta, dtype)
    return f, offset


def affine_parameters(layer, channels):
    """`(f, offset)`, float32 `[channels]` tensors with `layer(x) = x * f + offset` (inference).

    Args:
      layer: a BatchNormalization, Rescaling or Normalization acting on the last axis.
      channels: the size of that axis.
    """
    ops = keras.ops
    if isinstance(layer, keras.layers.BatchNormalization):
        f, offset = batchnorm_affine(layer)
    elif isinstance(layer, keras.layers.Rescaling):
        f, offset = (ops.convert_to_tensor(np.asarray(v, np.float32))
                     for v in (layer.scale, layer.offset))
    else:
        f = 1.0 / ops.maximum(ops.sqrt(ops.convert_to_tensor(layer.variance)),
                              keras.backend.epsilon())
        offset = -ops.convert_to_tensor(layer.mean) * f
    shape = [channels]
    f, offset = (ops.reshape(ops.broadcast_to(ops.cast(v, "float32"), [1] * 3 + shape), shape)
                 for v in (f, offset))
    return f, offset
