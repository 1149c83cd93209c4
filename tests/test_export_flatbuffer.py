"""`export.flatbuffer.write`: each distinct quantization vector and table stored once, the
model's values unchanged."""
import keras
import numpy as np
import pytest

import fqat_tf
from export import flatbuffer, tflite as export_lib, verify as verify_lib
from helpers import builtin_outputs


def _same_width_cnn():
    """Per-channel layers of equal width, whose zero-point vectors are equal."""
    x = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="stem")(x)
    for i in range(3):
        h = keras.layers.Conv2D(24, 1, activation="relu", name=f"pointwise{i}")(h)
        h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name=f"dw{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, keras.layers.Dense(5, name="classifier")(h))


@pytest.fixture(scope="module")
def exported():
    keras.utils.set_random_seed(5)
    x = np.random.default_rng(5).uniform(0, 1, size=(32, 12, 12, 3)).astype("float32")
    qmodel = fqat_tf.quantize_model(_same_width_cnn(), weight_bits=4, activation_bits=4,
                                    per_channel=True)
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    return export_lib.export(qmodel, [x]).tflite, x


def _plain(content):
    """The same object tree written by TensorFlow's writer: every vector stored again."""
    utils, _ = flatbuffer.modules()
    return bytes(utils.convert_object_to_bytearray(flatbuffer.read(content)))


def _quantization(content):
    model = flatbuffer.read(content)
    out = []
    for t in model.subgraphs[0].tensors:
        q = t.quantization
        out.append(None if q is None else (
            None if q.scale is None else np.asarray(q.scale).tolist(),
            None if q.zeroPoint is None else np.asarray(q.zeroPoint).tolist(),
            q.quantizedDimension))
    return out


def test_export_stores_each_zero_point_vector_once_and_the_model_is_unchanged(exported):
    content, x = exported
    plain = _plain(content)
    # The exporter's file is already written so: rewriting it changes nothing.
    assert flatbuffer.compact(content) == content
    zero_points = [np.asarray(q[1], np.int64) for q in _quantization(plain)
                   if q is not None and q[1] is not None]
    distinct = {z.tobytes() for z in zero_points}
    repeated = sum(z.nbytes for z in zero_points) - sum(len(b) for b in distinct)
    # The kernels and biases of the 7 convs of 24 channels hold one vector of 24 zeros.
    assert repeated >= (2 * 7 - 1) * 24 * 8
    assert len(plain) - len(content) >= repeated
    # LiteRT verifies the flatbuffer as it loads it, reads the same quantization and computes
    # the same integers, with XNNPACK and with its built-in kernels.
    assert _quantization(content) == _quantization(plain)
    np.testing.assert_array_equal(verify_lib.TFLiteModel(content)(x),
                                  verify_lib.TFLiteModel(plain)(x))
    np.testing.assert_array_equal(builtin_outputs(content, x), builtin_outputs(plain, x))


def test_write_leaves_the_object_tree_as_it_was(exported):
    content, _ = exported
    model = flatbuffer.read(content)
    before = _quantization(content)
    flatbuffer.write(model)
    utils, _ = flatbuffer.modules()
    assert _quantization(bytes(utils.convert_object_to_bytearray(model))) == before
