"""Integer TFLite export: BatchNorm folding, learned grids in int8 storage, end-to-end parity
(quantize, fit, convert, interpret, compare with Keras, all tensors integer)."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import fqat_tf
from fqat_tf.storage import int8_storage_model
from export import fold, tflite as export_lib, verify as verify_lib, xnnpack
from export.graph import ExportGraph, UnsupportedLayerError, nested_range
from helpers import compile_fit, randomize_batchnorm, resnet_like, task


def reference_interpreter(content):
    return Interpreter(model_content=content,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


@pytest.fixture(scope="module")
def float_model():
    keras.utils.set_random_seed(0)
    model = resnet_like()
    randomize_batchnorm(model, 0)
    x, y = task(384, 0)
    compile_fit(model, x, y, 1e-2, 2)
    return model


def test_fold_batchnorm_single_conv_matches_keras():
    keras.utils.set_random_seed(1)
    x = keras.Input((6, 6, 4))
    conv = keras.layers.Conv2D(5, 3, padding="same", use_bias=True)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    model = keras.Model(x, bn(conv(x)))
    randomize_batchnorm(model, 1)
    conv.bias.assign(np.linspace(-1, 1, 5).astype("float32"))
    f, offset = fold.batchnorm_affine(bn, 4)
    # Hand-computed from the layer's own variables.
    want_f = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + 1e-3)
    np.testing.assert_allclose(f, want_f, rtol=1e-6)
    np.testing.assert_allclose(offset, bn.beta.numpy() - bn.moving_mean.numpy() * want_f,
                               rtol=1e-6, atol=1e-7)
    kernel, bias = fold.fold_batchnorm(conv.kernel.numpy(), conv.bias.numpy(), f, offset)
    images = np.random.default_rng(1).normal(size=(3, 6, 6, 4)).astype("float64")
    folded = tf.nn.conv2d(images, kernel, 1, "SAME").numpy() + bias
    np.testing.assert_allclose(folded, model(images, training=False).numpy(), rtol=1e-5,
                               atol=1e-5)
    # The float export graph folds it the same way.
    graph = ExportGraph(model)
    np.testing.assert_allclose(graph.build(tf.constant(images, tf.float32), "float").numpy(),
                               folded, rtol=1e-5, atol=1e-5)


def test_folded_grid_keeps_integers_and_counts_moved():
    rng = np.random.default_rng(2)
    ints = rng.integers(-8, 8, size=(3, 3, 2, 4)).astype(np.float64)
    f = np.array([0.5, -2.0, 1.5, -0.25])
    kernel, scales, moved = fold.folded_grid_kernel(ints, 0.1, f)
    np.testing.assert_allclose(scales, 0.1 * np.abs(f))
    np.testing.assert_allclose(kernel / scales, ints * np.sign(f))
    assert moved == 0
    ints8 = np.full((1, 1, 1, 2), -128.0)
    assert fold.folded_grid_kernel(ints8, 0.1, np.array([1.0, -1.0]))[2] == 2
    # Depthwise kernels are [kh, kw, in, multiplier]; channels run over in * multiplier.
    dw = rng.integers(-4, 4, size=(3, 3, 2, 3)).astype(np.float64)
    kernel, scales, _ = fold.folded_grid_kernel(dw, np.array([0.1, 0.2, 0.3]),
                                                np.arange(1, 7, dtype=np.float64), True)
    np.testing.assert_allclose(scales, np.tile([0.1, 0.2, 0.3], 2) * np.arange(1, 7))
    np.testing.assert_allclose(kernel, dw * scales.reshape(2, 3))
    with pytest.raises(ValueError, match="4-bit grid"):
        fold.grid_integers(np.array([0.15, 0.3]), 0.1, 4)


def test_nested_range_makes_requantization_exact():
    # 255 * 0.3 / 6 = 12.75: the largest odd m is 11, the step 0.3 / 11.
    lo, hi = nested_range(0.0, 6.0, 0.3)
    assert lo == 0.0 and hi == pytest.approx(255 * 0.3 / 11)
    assert nested_range(-1.0, 3.0, 0.1) == pytest.approx((-1.0, -1.0 + 255 * 0.1 / 5))
    assert nested_range(0.0, 6.0, 0.02) is None
    x = np.random.default_rng(0).uniform(0, 6, 200000)
    direct = np.round(np.minimum(x, 15 * 0.3) / 0.3)
    for s0, exact in ((hi / 255, True), (6.0 / 255, False)):
        twice = np.round(np.minimum(np.round(x / s0) * s0, 15 * 0.3) / 0.3)
        assert np.array_equal(twice, direct) == exact


def _quantized(float_model, bits, seed):
    keras.utils.set_random_seed(seed)
    x, y = task(256, seed)
    qmodel = fqat_tf.quantize_model(float_model, weight_bits=bits, activation_bits=bits)
    fqat_tf.calibrate_scales(qmodel, [x[:128]], num_batches=1)
    compile_fit(qmodel, x, y, 1e-3, 1)
    return qmodel, x


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_end_to_end_parity(float_model, bits, tmp_path):
    qmodel, x = _quantized(float_model, bits, bits)
    graph = ExportGraph(qmodel)
    test_x, test_y = task(256, 100 + bits)
    # Observe mode is the Keras model rebuilt with BatchNorm folded: equal up to float
    # rounding, which moves an activation across a grid boundary now and then.
    observed = graph.build(tf.constant(test_x), "observe")[0].numpy()
    assert np.mean(np.abs(observed - qmodel(test_x, training=False).numpy()) < 1e-4) > 0.97
    result = export_lib.export(qmodel, [x[:128], x[128:]])
    path = tmp_path / "m.tflite"
    path.write_bytes(result.tflite)
    report = verify_lib.verify(str(path), qmodel, [(test_x[:128], test_y[:128]),
                                                   (test_x[128:], test_y[128:])])
    assert report["float_tensors"] == [] and report["input_dtype"] == "int8"
    assert report["images"] == 256
    # Independent recomputation of the figures from the raw interpreter output.
    logits = verify_lib.TFLiteModel(result.tflite)(test_x)
    keras_logits = qmodel(test_x, training=False).numpy()
    assert report["agreement"] == np.mean(logits.argmax(1) == keras_logits.argmax(1))
    assert report["tflite_accuracy"] == np.mean(logits.argmax(1) == test_y)
    assert report["keras_accuracy"] > 0.8
    assert report["agreement"] >= 0.95
    # The converter did what the graph says: the TF fake-quant graph gives the same logits but
    # for integer rounding (int32 biases, integer means), a step or so. (A scale the converter
    # got wrong costs tens of steps.)
    tf_int8 = graph.build(tf.constant(test_x), "int8", result.ranges).numpy()
    assert np.mean(np.abs(tf_int8 - logits)) <= 2 * report["output_step"]
    _check_learned_grids(qmodel, result.tflite, bits)


def _check_learned_grids(qmodel, content, bits):
    """Every learned kernel is stored as its b-bit integers times step * |BN factor|; every
    learned input step is the scale of an int8 tensor, the model input's among them."""
    it = reference_interpreter(content)
    it.allocate_tensors()
    in_scale = it.get_input_details()[0]["quantization"][0]
    np.testing.assert_allclose(in_scale, qmodel.get_layer("conv1").input_variables["step"].numpy(),
                               rtol=1e-6)
    # Every learned activation grid is the scale of the int8 tensor its conv reads.
    scales = np.array([t["quantization"][0] for t in it.get_tensor_details()
                       if t["dtype"] == np.int8])
    for wrapper in fqat_tf.quantize.quantize_wrappers(qmodel):
        if wrapper.input_variables is not None:
            step = wrapper.input_variables["step"].numpy()
            assert np.min(np.abs(scales / step - 1)) < 1e-6, wrapper.name
    stored = [t for t in it.get_tensor_details() if t["dtype"] == np.int8
              and len(t["shape"]) == 4 and len(t["quantization_parameters"]["scales"]) > 1]
    for name, bn_name in (("block_conv1", "block_bn1"), ("block_conv2", "block_bn2"),
                          ("downsample", "downsample_bn")):
        wrapper, bn = qmodel.get_layer(name), qmodel.get_layer(bn_name)
        step = wrapper.weight_variables["step"].numpy()
        ints = np.round(wrapper.quantized_kernel().numpy() / step)
        f = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        want = np.clip(np.transpose(ints * np.sign(f), (3, 0, 1, 2)), -127, 127)
        match = [t for t in stored if tuple(t["shape"]) == want.shape
                 and np.array_equal(it.get_tensor(t["index"]), want)]
        assert len(match) == 1, name
        np.testing.assert_allclose(match[0]["quantization_parameters"]["scales"],
                                   step * np.abs(f), rtol=1e-5)
        assert np.abs(ints).max() <= 2 ** (bits - 1)


def test_float_io_keeps_every_inner_tensor_integer(float_model):
    qmodel, x = _quantized(float_model, 4, 7)
    content = export_lib.convert(qmodel, [x], int8_io=False)
    it = reference_interpreter(content)
    assert it.get_input_details()[0]["dtype"] == np.float32
    assert it.get_output_details()[0]["dtype"] == np.float32
    assert verify_lib.float_tensors(content) == []
    int8_logits = verify_lib.TFLiteModel(export_lib.convert(qmodel, [x]))(x[:64])
    np.testing.assert_allclose(verify_lib.TFLiteModel(content)(x[:64]), int8_logits, atol=1e-5)


def test_group_norm_network_is_integer():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inputs)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GroupNormalization(4, name="gn1")(h)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="c2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GroupNormalization(4, name="gn2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="classifier")(h))
    x = np.random.default_rng(3).normal(size=(64, 12, 12, 3)).astype("float32")
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    graph = ExportGraph(qmodel)
    observed = graph.build(tf.constant(x), "observe")[0].numpy()
    assert np.mean(np.abs(observed - qmodel(x, training=False).numpy()) < 1e-4) > 0.97
    content = export_lib.convert(qmodel, [x])
    assert verify_lib.float_tensors(content) == []
    ops = {op["op_name"] for op in reference_interpreter(content)._get_ops_details()}
    assert {"BATCH_MATMUL", "RSQRT", "MEAN", "MUL"} <= ops
    logits = verify_lib.TFLiteModel(content)(x)
    assert np.mean(logits.argmax(1) == qmodel(x, training=False).numpy().argmax(1)) >= 0.8


def test_unsupported_layer_is_named_or_left_float():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    h = keras.layers.LayerNormalization(name="odd_norm")(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    x = np.random.default_rng(4).normal(size=(8, 8, 8, 3)).astype("float32")
    with pytest.raises(UnsupportedLayerError, match="'odd_norm' \\(LayerNormalization\\)"):
        export_lib.export(qmodel, [x])
    result = export_lib.export(qmodel, [x], allow_float=True)
    assert len(result.float_layers) == 1 and result.float_layers[0].startswith("odd_norm")
    assert verify_lib.float_tensors(result.tflite)
    with pytest.raises(export_lib.ExportError, match="empty"):
        export_lib.export(qmodel, [], allow_float=True)


def test_dead_layer_that_xnnpack_cannot_run_is_refused_by_name(monkeypatch):
    # A conv whose quantized input is all zero outputs its bias, a constant: its output range is
    # narrower than one accumulator step, a requantization XNNPACK fails to prepare.
    keras.utils.set_random_seed(6)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.Conv2D(4, 1, name="dead")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4))
    x = np.random.default_rng(6).normal(size=(16, 8, 8, 3)).astype("float32")
    fqat_tf.calibrate_scales(smodel, [x], num_batches=1)
    fqat_tf.calibrate_ranges(smodel, [x], num_batches=1)
    assert not xnnpack.requantization_problems(export_lib.export(smodel, [x]).tflite)
    smodel.get_layer("dead").input_variables["step"].assign(1e3)
    fqat_tf.calibrate_ranges(smodel, [x], num_batches=1)
    with pytest.raises(export_lib.ExportError, match="layer 'dead' \\(CONV_2D\\).*XNNPACK"):
        export_lib.export(smodel, [x])
    # The file the check refuses is one LiteRT's default runtime cannot prepare.
    monkeypatch.setattr(export_lib, "_check_runnable", lambda content: None)
    content = export_lib.export(smodel, [x]).tflite
    assert xnnpack.requantization_problems(content)[0]["layer"] == "dead"
    with pytest.raises(RuntimeError, match="XNNPACK"):
        Interpreter(model_content=content).allocate_tensors()


def test_depthwise_concat_pooling_and_per_channel_dense():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.ReLU()(keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs))
    a = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    a = keras.layers.ReLU()(keras.layers.BatchNormalization(name="dw_bn")(a))
    b = keras.layers.ReLU()(keras.layers.Conv2D(4, 1, name="pw")(h))
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Flatten()(keras.layers.AveragePooling2D(2)(h))
    h = keras.layers.Dense(16, activation="relu", name="fc")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="classifier")(h))
    randomize_batchnorm(model, 5)
    x = np.random.default_rng(5).normal(size=(64, 12, 12, 3)).astype("float32")
    qmodel = fqat_tf.quantize_model(model, weight_bits=8, activation_bits=8, per_channel=True)
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    graph = ExportGraph(qmodel)
    assert graph.weights["fc"].as_conv and graph.weights["dw"].depthwise
    result = export_lib.export(qmodel, [x])
    assert verify_lib.float_tensors(result.tflite) == []
    ops = {op["op_name"] for op in reference_interpreter(result.tflite)._get_ops_details()}
    assert {"DEPTHWISE_CONV_2D", "CONCATENATION", "AVERAGE_POOL_2D"} <= ops
    logits = verify_lib.TFLiteModel(result.tflite)(x)
    keras_logits = qmodel(x, training=False).numpy()
    assert np.mean(logits.argmax(1) == keras_logits.argmax(1)) >= 0.9
