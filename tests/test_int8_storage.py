"""Integer storage in training (`fqat_tf.int8_storage`, `fqat_tf.storage`): range quantizers,
int8 kernels and int32 biases, the simulated int8 GroupNorm, and exports that match the trained
Keras model."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fqat_tf
from export import tflite as export_lib, verify as verify_lib
from export.graph import ExportGraph
from fqat_tf import int8_kernels, int8_storage, models, quantize_configs as qc, quantizers
from fqat_tf.storage import int8_storage_model, sync_input_scales
from fqat_tf.wrapper import QuantizeWrapper
from helpers import (compile_fit, mirrored, parse_train_flags, randomize_batchnorm, resnet_like,
                     storage_resnet, task)


def _range_model(**kwargs):
    x = keras.Input((3,))
    return keras.Model(x, fqat_tf.RangeQuantize(name="rq", **kwargs)(x))


def test_range_quantize_is_identity_until_calibrated_then_on_the_8bit_grid():
    model = _range_model()
    x = np.array([[-1.0, 0.3, 2.0]], np.float32)
    np.testing.assert_array_equal(model(x), x)
    assert model.get_layer("rq").range is None
    ranges = fqat_tf.calibrate_ranges(model, [x, np.array([[-0.5, 0.1, 3.0]], np.float32)], 2)
    assert ranges == {"rq": {"output": (-1.0, 3.0)}}
    # Scale 4/255; the zero point -(-1)/scale = 63.75 is nudged to 64 (as the converter does),
    # so the grid runs from -64 to 191 steps: -1.0 is -63.75 steps, 0.3 is 19.125, and 4.0
    # saturates at 191.
    scale = 4.0 / 255.0
    y = model(np.array([[-1.0, 0.3, 4.0]], np.float32)).numpy()
    np.testing.assert_allclose(y, [[-64 * scale, 19 * scale, 191 * scale]], rtol=1e-6)


def test_range_quantize_rounds_near_a_boundary_as_the_integer_kernel_does():
    # A range whose zero point sits near its top (a residual sum of mostly negative values):
    # FakeQuant rounds x - min, 111 units away, and loses the last bits that decide values
    # close to a rounding boundary. The integer kernel rounds x / scale.
    lo, hi = -111.17548370361328, 1.3235175609588623
    scale, zero = (v.numpy() for v in int8_kernels.quantization_params(lo, hi))
    rng = np.random.default_rng(0)
    k = rng.integers(-128 - int(zero), 127 - int(zero), size=20000)
    # float32 values 1.2e-5 to 3e-5 of a step from the boundary between k and k + 1 steps:
    # farther than float32's relative error of x / scale (at most 1.5e-5 of a step at 250
    # steps from 0), nearer than FakeQuant's (up to about 4e-5 here).
    offset = rng.choice([-1.0, 1.0], size=k.shape) * rng.uniform(1e-5, 4e-5, size=k.shape)
    x = ((k + 0.5 + offset) * np.float64(scale)).astype(np.float32)
    steps = x.astype(np.float64) / np.float64(scale)
    x = x[(np.abs(steps - k - 0.5) >= 1.2e-5) & (np.abs(steps - k - 0.5) <= 3e-5)]
    exact = np.round(x.astype(np.float64) / np.float64(scale))
    assert len(x) > 5000
    y = int8_storage.range_quantize(tf.constant(x), lo, hi).numpy()
    np.testing.assert_array_equal(np.round(y.astype(np.float64) / np.float64(scale)), exact)
    fake = tf.quantization.fake_quant_with_min_max_vars(tf.constant(x), lo, hi).numpy()
    assert (np.round(fake.astype(np.float64) / np.float64(scale)) != exact).mean() > 0.02
    # FakeQuant's gradient: through inside the nudged range, zero outside it.
    inputs = tf.constant([-200.0, -1.0, 0.5, 200.0])
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = int8_storage.range_quantize(inputs, lo, hi)
    np.testing.assert_array_equal(tape.gradient(out, inputs), [0.0, 1.0, 1.0, 0.0])


def test_range_quantize_moving_average_and_first_training_batch():
    model = _range_model(ema_decay=0.5)
    layer = model.get_layer("rq")
    model(np.array([[-1.0, 0.0, 3.0]], np.float32), training=True)
    assert layer.range == (-1.0, 3.0)                 # the first batch sets the range
    model(np.array([[-3.0, 0.0, 1.0]], np.float32), training=True)
    assert layer.range == (-2.0, 2.0)                 # 0.5 * old + 0.5 * batch
    model(np.array([[1.0, 2.0, np.inf]], np.float32), training=True)
    assert layer.range == (-1.0, 2.0)                 # min 1 -> -1; inf left out (max 2)
    y = model(np.array([[np.inf, -5.0, 0.5]], np.float32)).numpy()
    assert np.isfinite(y).all() and y[0, 0] == y.max() and y[0, 1] == y.min()


def test_range_quantize_survives_save_and_load(tmp_path):
    model = _range_model(ema_decay=0.9)
    fqat_tf.calibrate_ranges(model, [np.array([[-1.0, 0.5, 4.0]], np.float32)], 1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("rq").range == (-1.0, 4.0)
    assert loaded.get_layer("rq").ema_decay == 0.9
    x = np.array([[0.123, -0.77, 3.3]], np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_kernel_is_on_its_int8_grid_with_a_straight_through_gradient(per_channel):
    k = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 4, 5)), tf.float32)
    scales = int8_storage.abs_max_scales(k, per_channel).numpy()
    assert scales.shape == ((5,) if per_channel else ())
    with tf.GradientTape() as tape:
        tape.watch(k)
        q = int8_storage.int8_kernel(k, per_channel)
        loss = tf.reduce_sum(q * tf.reshape(tf.range(1.0, 1.0 + tf.size(q, tf.float32)),
                                            q.shape))
    ints = q.numpy() / scales
    np.testing.assert_allclose(ints, np.round(ints), atol=1e-4)
    axes = (0, 1, 2) if per_channel else None
    np.testing.assert_allclose(np.abs(np.round(ints)).max(axis=axes), 127)
    assert np.abs(q.numpy() - k.numpy()).max() <= scales.max() / 2 + 1e-7
    np.testing.assert_allclose(tape.gradient(loss, k).numpy().reshape(-1),
                               np.arange(1.0, 1.0 + k.numpy().size))


def test_abs_max_scales_serve_numpy_and_tensors():
    k = np.zeros((1, 1, 2, 3), np.float32)
    k[0, 0, 0] = [-2.54, 0.0, 1.27]
    k[0, 0, 1] = [1.0, 0.0, -0.5]
    # numpy gives float64 (the exporter's arithmetic), tensors their own dtype: hand values.
    np.testing.assert_allclose(int8_storage.abs_max_scales(k),
                               [2.54 / 127, 1e-12 / 127, 1.27 / 127], rtol=1e-6)
    assert int8_storage.abs_max_scales(k).dtype == np.float64
    np.testing.assert_allclose(int8_storage.abs_max_scales(tf.constant(k)).numpy(),
                               [2.54 / 127, 1e-12 / 127, 1.27 / 127], rtol=1e-6)
    np.testing.assert_allclose(int8_storage.abs_max_scales(k, per_channel=False), 2.54 / 127,
                               rtol=1e-6)


def test_saturating_rsqrt_is_infinite_at_zero_with_a_zero_gradient():
    x = tf.constant([0.0, 4.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = int8_storage.saturating_rsqrt(x)
    np.testing.assert_array_equal(y.numpy(), [np.inf, 0.5])
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [0.0, -0.5 * 4.0 ** -1.5])


def test_int8_group_norm_is_group_norm_until_calibrated():
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(4, 5, 5, 8)).astype(np.float32)
    plain = keras.layers.GroupNormalization(groups=4, epsilon=1e-5)
    plain.build(x.shape)
    rng = np.random.default_rng(2)
    plain.gamma.assign(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    plain.beta.assign(rng.normal(0, 0.3, 8).astype(np.float32))
    stored = fqat_tf.Int8GroupNormalization(groups=4, epsilon=1e-5)
    stored.build(x.shape)
    stored.gamma.assign(plain.gamma)
    stored.beta.assign(plain.beta)
    np.testing.assert_allclose(stored(x), plain(x), atol=1e-4)
    model = keras.Sequential([keras.Input(x.shape[1:]), stored])
    ranges = fqat_tf.calibrate_ranges(model, [x], 1)[stored.name]
    assert set(ranges) == set(int8_storage.GROUP_NORM_PARTS)
    quantized = stored(x).numpy()
    assert 0 < np.abs(quantized - plain(x).numpy()).max() < 0.1


def test_storage_model_stores_what_the_exporter_stores_and_copies_the_rest():
    qmodel, smodel, _, _ = storage_resnet(4)
    names = {l.name for l in smodel.layers if isinstance(l, fqat_tf.RangeQuantize)}
    # The exporter's "range" tensors: each residual branch before the sum, the block output,
    # the pooled features and the logits, and the stem output, which two quantizers read:
    # their steps train apart, so it is stored on a range of its own even while they agree.
    assert names == {"block_bn2_int8", "downsample_bn_int8", "relu_out_int8", "avgpool_int8",
                     "classifier_int8", "relu1_int8"}
    wrappers = fqat_tf.quantize.quantize_wrappers(smodel)
    assert wrappers and all(w.int8_storage for w in wrappers)
    for w in wrappers:
        old = qmodel.get_layer(w.name)
        for a, b in zip(w.weights, old.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    qmodel.get_layer("downsample").input_variables["step"].assign(
        qmodel.get_layer("block_conv1").input_variables["step"])
    assert "relu1_int8" in {l.name for l in int8_storage_model(qmodel).layers}
    with pytest.raises(ValueError, match="int8 storage layers already"):
        int8_storage_model(smodel)
    with pytest.raises(ValueError, match="_int8' \\(RangeQuantize\\): its int8 ranges were "
                                         "never set; call fqat_tf.calibrate_ranges"):
        export_lib.export(smodel, [task(8, 1)[0]])


def test_bias_is_on_the_int32_grid_of_input_step_times_kernel_scale():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 3, name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    for layer in (model.get_layer("c1"), model.get_layer("c2")):
        layer.bias.assign(np.random.default_rng(5).normal(0, 0.2, 4).astype(np.float32))
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4))
    for name in ("c1", "c2"):
        w = smodel.get_layer(name)
        grid = (w.input_variables["step"].numpy() * w.kernel_scales().numpy())
        q = w.quantized_bias().numpy()
        np.testing.assert_allclose(q / grid, np.round(q / grid), atol=1e-3)
        assert np.abs(q - w.layer.bias.numpy()).max() <= grid.max() / 2 + 1e-7
    # The classifier reads a float-stored tensor: its bias stays float.
    head = smodel.get_layer("head")
    np.testing.assert_array_equal(head.quantized_bias().numpy(), head.layer.bias.numpy())


@pytest.mark.parametrize("bits", [4, 3])
def test_trained_storage_resnet_exports_to_an_integer_model_that_matches_it(bits, tmp_path):
    _, smodel, x, y = storage_resnet(bits)
    batches = [x[:128], x[128:256]]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=2)
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=2)
    compile_fit(smodel, x, y, 1e-3, 1)
    result = export_lib.export(smodel, batches)
    graph = ExportGraph(smodel)
    for name, rng in graph.stored_ranges.items():
        assert result.ranges[name] == rng            # the trained ranges, not re-observed ones
    test_x, test_y = task(512, 100 + bits)
    observed = graph.build(tf.constant(test_x), "observe")[0].numpy()
    keras_logits = smodel(test_x, training=False).numpy()
    assert np.mean(np.abs(observed - keras_logits) < 1e-4) > 0.99
    path = tmp_path / "m.tflite"
    path.write_bytes(result.tflite)
    report = verify_lib.verify(str(path), smodel, [(test_x, test_y)])
    assert report["float_tensors"] == [] and report["keras_accuracy"] > 0.8
    # The paper's recipe agrees 95-97% on this model at these widths (test_export.py).
    assert report["agreement"] >= 0.99
    assert report["max_logit_diff_steps"] <= 8


def test_group_norm_storage_model_exports_within_rounding():
    keras.utils.set_random_seed(0)
    model = models.mnist_cnn(3, input_shape=(12, 12, 3), width=8)
    x, y = task(384, 0)
    x = x[:, :12, :12]
    compile_fit(model, x, y, 1e-2, 2)
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4))
    assert {type(l) for l in smodel.layers
            if isinstance(l, keras.layers.GroupNormalization)} == {fqat_tf.Int8GroupNormalization}
    batches = [x[:128], x[128:256]]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=2)
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=2)
    compile_fit(smodel, x, y, 1e-3, 1)
    result = export_lib.export(smodel, batches)
    assert result.ranges and all(name in ExportGraph(smodel).stored_ranges
                                 for name in result.ranges)
    test_x, test_y = task(512, 7)
    test_x = test_x[:, :12, :12]
    logits = verify_lib.TFLiteModel(result.tflite)(test_x)
    keras_logits = smodel(test_x, training=False).numpy()
    assert verify_lib.float_tensors(result.tflite) == []
    assert np.mean(logits.argmax(1) == keras_logits.argmax(1)) >= 0.98


def test_training_program_with_int8_storage_exports_its_run(tmp_path, capsys):
    from export import verify as verify_cli
    from fqat_tf import rundir, trainer

    out = str(tmp_path / "qat")
    settings = parse_train_flags(["--flagfile=experiments/quickstart.cfg", "--smoke",
                                  "--int8_storage", f"--output_dir={out}",
                                  f"--erm_cache_dir={tmp_path}/erm", "--verbose=0"])
    trainer.run(settings)
    model = keras.saving.load_model(os.path.join(out, rundir.MODEL), safe_mode=True)
    layers = int8_storage.storage_layers(model)
    assert layers and all(layer.stored_ranges for layer in layers)
    tflite = str(tmp_path / "m.tflite")
    assert export_lib.main([out, "--out", tflite, "--representative_batches", "1"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["trained_ranges"] == summary["range_tensors"] > 0
    assert "NOTE" not in captured.err
    assert verify_cli.main([tflite, out, "--max_batches", "1", "--min_agreement", "0"]) == 0


def test_ranges_train_under_a_mirrored_strategy():
    from fqat_tf.fqat_model import FQATModel

    x, y = task(64, 3)
    with mirrored().scope():
        keras.utils.set_random_seed(0)
        _, smodel, _, _ = storage_resnet(4)
        # Ranges are running statistics: updated where BatchNorm's are (training=True).
        fq = FQATModel(smodel, "fqat", rho=0.05, alpha=0.001, freeze_interval=2,
                       freeze_bn=False)
        fq.compile(optimizer=keras.optimizers.Adam(1e-3),
                   scale_optimizer=keras.optimizers.Adam(1e-3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fq.fit(x, y, batch_size=16, epochs=1, verbose=0)
    layers = int8_storage.storage_layers(smodel)
    assert layers
    for layer in layers:
        assert float(layer.initialized.numpy()) == 1.0
        for v in layer.non_trainable_weights:
            copies = [c.numpy() for c in v.value.values]
            assert len(copies) == 2 and np.isfinite(copies).all()
            assert copies[0] == copies[1], v.path          # the replicas agree


def test_8bit_learned_kernel_is_symmetric_as_tflite_stores_it():
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="c1")(keras.layers.ReLU()(inputs))
    h = keras.layers.Conv2D(3, 3, name="c2")(keras.layers.ReLU()(h))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    qmodel = fqat_tf.quantize_model(model, weight_bits=8, activation_bits=8)
    wrapper = qmodel.get_layer("c2")
    step = wrapper.weight_variables["step"]
    step.assign(np.full(step.shape, np.abs(wrapper.layer.kernel.numpy()).max() / 200, "float32"))
    ints = np.round(wrapper.quantized_kernel().numpy() / step.numpy())
    assert ints.min() == -128                                  # the recipe's 8-bit grid
    smodel = int8_storage_model(qmodel)
    ints = np.round(smodel.get_layer("c2").quantized_kernel().numpy() / step.numpy())
    assert ints.min() == -127 and ints.max() == 127
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    fqat_tf.calibrate_ranges(smodel, [x], 1)
    # The exporter has to move the recipe's -128s inward; the storage model has none.
    assert export_lib.export(qmodel, [x]).moved_weights["c2"] > 0
    assert export_lib.export(smodel, [x]).moved_weights == {}


def test_batchnorm_folds_into_its_conv_with_the_bias_on_tflites_grid(tmp_path):
    qmodel, smodel, x, _ = storage_resnet(4)
    # Every BatchNorm of this network follows a conv: all of them moved into the wrappers.
    assert not [l for l in smodel.layers if isinstance(l, keras.layers.BatchNormalization)]
    folded = {w.name: w for w in fqat_tf.quantize.quantize_wrappers(smodel) if w.batchnorm}
    assert set(folded) == {"conv1", "block_conv1", "block_conv2", "downsample"}
    # The calibration probe applies the folded BatchNorm: the steps come out as before.
    steps = fqat_tf.calibrate_scales(qmodel, [x[:64]], 1)
    again = fqat_tf.calibrate_scales(smodel, [x[:64]], 1)
    assert again.keys() == steps.keys()
    for name, roles in steps.items():
        assert roles.keys() == again[name].keys()
        for role, step in roles.items():
            np.testing.assert_allclose(again[name][role], step, rtol=1e-6)
    wrapper, bn = folded["block_conv2"], qmodel.get_layer("block_bn2")
    conv = qmodel.get_layer("block_conv2")
    h = keras.Model(qmodel.inputs, qmodel.get_layer("block_relu1").output)(x[:8])
    plain = bn(conv(h), training=False).numpy()
    stored = wrapper(h, training=False).numpy()
    f = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    grid = (wrapper.input_variables["step"].numpy() * wrapper.weight_variables["step"].numpy()
            * np.abs(f))
    bias = wrapper.folded_bias().numpy()
    np.testing.assert_allclose(bias / grid, np.round(bias / grid), atol=1e-3)
    assert np.abs(stored - plain).max() <= grid.max() / 2 + 1e-5
    # With training statistics it is the BatchNorm itself.
    np.testing.assert_allclose(wrapper(h, training=True), bn(conv(h), training=True), atol=1e-5)
    path = str(tmp_path / "m.keras")
    smodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x[:8], training=False), smodel(x[:8], training=False))


def _exact_case(kind):
    """A layer of `kind`, an input whose products float32 cannot sum exactly, and the numpy
    conv / matmul that applies a layer's op to float64 operands."""
    rng = np.random.default_rng(7)
    if kind == "dense":
        layer, x = keras.layers.Dense(24, use_bias=False), rng.normal(size=(6, 300))
        return layer, x.astype("float32"), lambda a, k: a @ k
    if kind == "depthwise":
        layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
        op = lambda a, k: tf.nn.depthwise_conv2d(a, k, [1, 1, 1, 1], "VALID").numpy()  # noqa: E731
    else:
        layer = keras.layers.Conv2D(12, 3, use_bias=False)
        op = lambda a, k: tf.nn.conv2d(a, k, 1, "VALID").numpy()  # noqa: E731
    x = rng.normal(size=(2, 9, 9, 40)).astype("float32")
    return layer, x, op


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_storage_linear_ops_sum_the_integers_exactly_with_float_gradients(kind):
    layer, x, op = _exact_case(kind)
    cfg_args = (quantizers.LSQQuantizer(4, signed=True, per_channel=True),
                quantizers.LSQQuantizer(8, signed=True))
    wrappers = {}
    for storage in (False, True):
        keras.utils.set_random_seed(0)
        inner = keras.layers.deserialize(keras.layers.serialize(layer))
        w = QuantizeWrapper(inner, qc.WeightInputQuantizeConfig(*cfg_args), int8_storage=storage)
        w.build(x.shape)
        channels = w.kernel_view().shape[-1]
        # Steps that are no powers of two, so that each product is rounded in float32.
        w.weight_variables["step"].assign(np.linspace(0.013, 0.031, channels).astype("float32"))
        w.input_variables["step"].assign(0.0173)
        wrappers[storage] = w
    w = wrappers[True]
    kernel = w.layer.kernel.numpy()
    s_x = np.float32(0.0173)
    s_w = w.weight_variables["step"].numpy()
    q_x = np.clip(np.round(x / s_x), -128, 127)
    view = w.kernel_view().numpy()
    q_w = np.clip(np.round(view / s_w), -8, 7).reshape(kernel.shape)
    # The integer model's int32 sum, exact in float64, times one float32 scale per channel.
    acc = op(q_x.astype("float64"), q_w.astype("float64"))
    expected = acc.astype("float32") * (s_x * s_w)
    np.testing.assert_array_equal(w(x).numpy(), expected)
    # The float products of the same quantized operands do not give those values.
    float_products = wrappers[False](x).numpy()
    assert not np.array_equal(float_products, expected)
    np.testing.assert_allclose(float_products, expected, rtol=1e-5, atol=1e-5)
    # The gradients are those of the float products up to rounding: not bit-equal, since the
    # forward values they start from differ in their last bits.
    grads = {}
    for storage, wr in wrappers.items():
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(tf.sin(wr(xt)))
        grads[storage] = tape.gradient(loss, [xt, wr.layer.kernel, *wr.scale_variables])
    for with_storage, plain in zip(grads[True], grads[False]):
        np.testing.assert_allclose(with_storage, plain, rtol=1e-4, atol=2e-5)


def test_a_stored_input_is_summed_exactly_only_while_its_scale_is_synced():
    rng = np.random.default_rng(3)
    scale = np.float32(0.0371)
    # An input as a range stores it: integers (less the zero point) times the range's scale.
    x = (rng.integers(-128, 128, size=(2, 7, 7, 48)) * scale).astype("float32")
    conv = keras.layers.Conv2D(10, 3, use_bias=False)
    w = QuantizeWrapper(conv, qc.WeightOnlyQuantizeConfig(
        quantizers.LSQQuantizer(4, signed=True, per_channel=True)), int8_storage=True)
    w.build(x.shape)
    assert w.reads_stored_input
    w.weight_variables["step"].assign(np.linspace(0.011, 0.029, 10).astype("float32"))
    kq = w.quantized_kernel()
    float_products = conv.convolution_op(x, kq).numpy()
    q_w = np.round(kq.numpy() / w.weight_variables["step"].numpy())
    acc = tf.nn.conv2d(np.round(x / scale).astype("float64"), q_w.astype("float64"), 1,
                       "VALID").numpy()
    exact = acc.astype("float32") * (scale * w.weight_variables["step"].numpy())
    assert not np.array_equal(float_products, exact)
    # Unsynced (0), then a stale copy of the scale: the input is not on that grid, and the
    # layer keeps the float products rather than rounding the input onto a wrong grid.
    for copy in (0.0, scale * 1.01, scale):
        w.input_storage_scale.assign(copy)
        for call in (w, tf.function(w)):
            np.testing.assert_array_equal(call(x).numpy(),
                                          exact if copy == scale else float_products)


@pytest.mark.parametrize("shared_inputs", ["learned", "stored"])
def test_a_storage_model_computes_the_same_bits_eagerly_and_in_a_graph(shared_inputs):
    # Grappler rewrites a graph's arithmetic: it reorders chains of products and multiplies by
    # the reciprocal of a constant divisor. A scale or multiplier computed in float32 then
    # differs in its last bit from an eager call's, and every tensor after it with it; a value
    # near a rounding boundary of the next grid is then stored differently by `predict()`
    # than by the eager call `export.verify` compares against.
    keras.utils.set_random_seed(3)
    model = resnet_like()
    randomize_batchnorm(model, 0)
    x, y = task(256, 0)
    compile_fit(model, x, y, 1e-2, 1)
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=3, activation_bits=3,
                                                       shared_inputs=shared_inputs))
    fqat_tf.calibrate_scales(smodel, [x[:128]], num_batches=1, source="quantized")
    fqat_tf.calibrate_ranges(smodel, [x[:128]], num_batches=1)
    sync_input_scales(smodel)
    layers = [l for l in smodel.layers if not isinstance(l, keras.layers.InputLayer)]
    probe = keras.Model(smodel.inputs, [l.output for l in layers])
    eager = probe(x[:64], training=False)
    graph = tf.function(lambda v: probe(v, training=False))(x[:64])
    for layer, a, b in zip(layers, eager, graph):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=layer.name)
    np.testing.assert_array_equal(smodel.predict(x[:64], verbose=0),
                                  smodel(x[:64], training=False).numpy())
