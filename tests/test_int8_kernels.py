"""The Keras int8 lowering of each activation (`fqat_tf.Int8Activation`) against TFLite's own
kernel: a one-op TFLite model (FakeQuant, the op, FakeQuant) run in ai_edge_litert on all 256
int8 inputs must give the very integers the Keras layer gives."""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import fqat_tf
from fqat_tf import activations, int8_kernels
from fqat_tf.int8_activations import HARD_SIGMOID_AFFINE, Int8Activation

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)


def _fq(x, lo, hi):
    return tf.quantization.fake_quant_with_min_max_args(x, float(lo), float(hi), num_bits=8)


def _hard_sigmoid_op(x):
    """relu6(x + 3) / 6 as the depthwise multiply-add the exporter emits (weights 1/6 on their
    int8 grid, bias 1/2); the output range [0, 1] does the clipping."""
    f, offset = HARD_SIGMOID_AFFINE
    k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        tf.fill([1, 1, 1, 1], f), [-f], [f], num_bits=8, narrow_range=True)
    return tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID") + offset


# The TF ops the converter turns into each TFLite kernel, and that kernel's op names.
OPS = {
    "sigmoid": (tf.sigmoid, ["LOGISTIC"]),
    "tanh": (tf.tanh, ["TANH"]),
    "softmax": (lambda x: tf.nn.softmax(x, axis=-1), ["SOFTMAX"]),
    "hard_silu": (lambda x: x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0), ["HARD_SWISH"]),
    "hard_sigmoid": (_hard_sigmoid_op, ["DEPTHWISE_CONV_2D"]),
}
INPUT_RANGES = [(-6.0, 5.0), (-0.7, 13.0), (-21.0, 2.5)]


def _one_op_model(op, input_range, output_range, shape):
    fn = tf.function(lambda x: _fq(op(_fq(x, *input_range)), *output_range),
                     input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The input's scale comes from its FakeQuant; no separate statistics are needed.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def _run(content, q):
    it = Interpreter(model_content=content)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(inp["index"], q.reshape(inp["shape"]))
    it.invoke()
    ops = [op["op_name"] for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]
    return (it.get_tensor(out["index"]).reshape(q.shape).astype(np.int32), inp["quantization"],
            out["quantization"], ops)


def _calibrated_layer(name, input_range, shape):
    """An `Int8Activation` whose input range is exactly `input_range` (calibrated on data that
    spans it)."""
    model = keras.Sequential([keras.Input(shape), Int8Activation(name, name="act")])
    lo, hi = input_range
    span = np.linspace(lo, hi, int(np.prod(shape)), dtype=np.float32).reshape((1,) + shape)
    fqat_tf.calibrate_ranges(model, [span], 1)
    layer = model.get_layer("act")
    assert layer.stored_ranges["input"] == pytest.approx(input_range)
    return layer


@pytest.mark.parametrize("input_range", INPUT_RANGES, ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_keras_lowering_is_tflites_kernel_on_every_int8_input(name, input_range):
    shape = (1, 256, 1) if name == "hard_sigmoid" else (256,)
    layer = _calibrated_layer(name, input_range, shape)
    ranges = layer.stored_ranges
    output_range = ranges.get("output") or activations.get(name).output_range
    op, op_names = OPS[name]
    content = _one_op_model(op, ranges["input"], output_range, (1,) + shape)
    q = ALL_INT8.reshape((1,) + shape)
    want, (in_scale, in_zero), (out_scale, out_zero), ops = _run(content, q)
    assert ops == op_names
    # The Keras layer on the real values of the 256 integers, read back as integers.
    x = (q.astype(np.float32) - in_zero) * np.float32(in_scale)
    y = layer(x, training=False).numpy()
    got = np.round(y / np.float32(out_scale)).astype(np.int32) + out_zero
    assert np.array_equal(got, want), np.argwhere(got != want)[:5]
    # The outputs spread over the grid (one softmax row of 256 logits puts most of them near
    # 0, so fewer levels there).
    assert len(np.unique(want)) > (8 if name == "softmax" else 20)


def test_softmax_rows_with_every_int8_logit():
    layer = _calibrated_layer("softmax", (-9.0, 7.0), (256,))
    rng = np.random.default_rng(0)
    rows = rng.integers(-128, 128, size=(32, 256)).astype(np.int8)
    rows[0] = ALL_INT8
    rows[1] = np.sort(ALL_INT8)[::-1]
    content = _one_op_model(OPS["softmax"][0], layer.stored_ranges["input"],
                            activations.get("softmax").output_range, (32, 256))
    want, (in_scale, in_zero), (out_scale, out_zero), _ = _run(content, rows)
    x = (rows.astype(np.float32) - in_zero) * np.float32(in_scale)
    got = np.round(layer(x, training=False).numpy() / out_scale).astype(np.int32) + out_zero
    assert np.array_equal(got, want)


def test_hard_swish_fixed_point_differs_from_float_rounding_where_tflite_does():
    # Input range [-5, 4], output [-0.4, 4]: the 16-bit arithmetic rounds one of the 256
    # inputs differently from round(hard_swish(x) / scale), and the table follows it.
    in_scale, in_zero = int8_kernels.quantization_params(-5.0, 4.0)
    out_scale, out_zero = int8_kernels.quantization_params(-0.4, 4.0)
    table = int8_kernels.hard_swish_table(in_scale, in_zero, out_scale, out_zero).numpy()
    x = (ALL_INT8.astype(np.float64) - int(in_zero)) * float(in_scale)
    rounded = np.clip(np.round(x * np.clip(x + 3, 0, 6) / 6 / float(out_scale)) + int(out_zero),
                      -128, 127)
    assert np.sum(table != rounded) == 1
    content = _one_op_model(OPS["hard_silu"][0], (-5.0, 4.0), (-0.4, 4.0), (1, 256))
    want = _run(content, ALL_INT8.reshape(1, 256))[0].reshape(-1)
    assert np.array_equal(table, want)


def test_quantization_params_are_the_converters():
    for lo, hi in [(-5.0, 4.0), (0.0, 1.0), (-0.3, 17.7), (-2.0, 0.0)]:
        content = _one_op_model(tf.identity, (lo, hi), (lo, hi), (1, 4))
        _, (scale, zero), _, _ = _run(content, np.zeros((1, 4), np.int8))
        s, z = int8_kernels.quantization_params(lo, hi)
        assert float(s.numpy()) == np.float32(scale) and int(z.numpy()) == zero
