"""quantize_model policy, training of scales, serialization, calibration and bad input."""
import logging

import keras
import numpy as np
import pytest

import fqat_tf
from fqat_tf import calibration, quantize_configs as qc
from fqat_tf.quantize import QuantizeWrapper, quantize_wrappers


def tiny_resnet(num_classes=5):
    """Stem, one residual block with a strided 1x1 downsample, BN, global pool, Dense head."""
    x = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(x)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    r = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="block_conv1")(h)
    r = keras.layers.BatchNormalization(name="block_bn1")(r)
    r = keras.layers.ReLU(name="block_relu1")(r)
    r = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False,
                            name="block_conv2")(r)
    r = keras.layers.BatchNormalization(name="block_bn2")(r)
    d = keras.layers.Conv2D(16, 1, strides=2, use_bias=False, name="downsample")(h)
    d = keras.layers.BatchNormalization(name="downsample_bn")(d)
    h = keras.layers.ReLU(name="relu_out")(keras.layers.Add(name="add")([r, d]))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(num_classes, name="classifier")(h)
    return keras.Model(x, out, name="tiny_resnet")


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 16, 16, 3)).astype("float32"),
            rng.integers(0, 5, size=n).astype("int32"))


def _configs(qmodel):
    return {w.name: w.quantize_config for w in quantize_wrappers(qmodel)}


def test_default_policy_on_resnet_style_model():
    model = tiny_resnet()
    qmodel = fqat_tf.quantize_model(model, weight_bits=3, activation_bits=4)
    cfg = _configs(qmodel)
    assert set(cfg) == {"conv1", "block_conv1", "block_conv2", "downsample", "classifier"}
    assert isinstance(cfg["conv1"], qc.InputOnlyQuantizeConfig)
    assert cfg["conv1"].input_quantizer.signed
    assert isinstance(cfg["classifier"], qc.NoQuantizeConfig)
    for name in ("block_conv1", "block_conv2", "downsample"):
        c = cfg[name]
        assert isinstance(c, qc.WeightInputQuantizeConfig)
        assert c.weight_quantizer.signed and c.weight_quantizer.num_bits == 3
        # Every one of these reads a ReLU output: unsigned 4-bit input.
        assert not c.input_quantizer.signed and c.input_quantizer.num_bits == 4
    names = [v.path for v in fqat_tf.scale_variables(qmodel)]
    assert names == ["conv1/input_step", "block_conv1/kernel_step", "block_conv1/input_step",
                     "block_conv2/kernel_step", "block_conv2/input_step",
                     "downsample/kernel_step", "downsample/input_step"]
    # Non-quantized layers are kept as they were (same types, same names).
    assert type(qmodel.get_layer("bn1")) is keras.layers.BatchNormalization
    assert type(qmodel.get_layer("add")) is keras.layers.Add


def test_input_after_normalisation_is_signed():
    x = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, name="c1")(x)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GroupNormalization(2, name="gn")(h)
    h = keras.layers.Conv2D(4, 3, name="c2")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, name="head")(h)
    qmodel = fqat_tf.quantize_model(keras.Model(x, out), weight_bits=4, activation_bits=4)
    assert _configs(qmodel)["c2"].input_quantizer.signed


def test_weights_copied_and_source_untouched():
    model = tiny_resnet()
    before = [w.copy() for w in model.get_weights()]
    qmodel = fqat_tf.quantize_model(model, weight_bits=8, activation_bits=8)
    np.testing.assert_array_equal(qmodel.get_layer("block_conv1").layer.kernel.numpy(),
                                  model.get_layer("block_conv1").kernel.numpy())
    np.testing.assert_array_equal(qmodel.get_layer("bn1").moving_variance.numpy(),
                                  model.get_layer("bn1").moving_variance.numpy())
    x, y = _data()
    qmodel.compile(optimizer=keras.optimizers.Adam(1e-2),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not any(isinstance(l, QuantizeWrapper) for l in model.layers)
    # At 8 bits with calibrated steps the quantized model tracks the float one closely.
    fresh = fqat_tf.quantize_model(model, weight_bits=8, activation_bits=8)
    fqat_tf.calibrate_scales(fresh, [x], num_batches=1)
    ref = model(x, training=False).numpy()
    np.testing.assert_allclose(fresh(x, training=False).numpy(), ref, atol=0.05 * np.abs(ref).max())


def test_fit_step_changes_every_scale():
    qmodel = fqat_tf.quantize_model(tiny_resnet(), weight_bits=4, activation_bits=4)
    before = [v.numpy().copy() for v in fqat_tf.scale_variables(qmodel)]
    x, y = _data()
    qmodel.compile(optimizer=keras.optimizers.Adam(1e-3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(x, y, epochs=1, verbose=0)
    for v, b in zip(fqat_tf.scale_variables(qmodel), before):
        assert not np.allclose(v.numpy(), b), v.path


@pytest.mark.parametrize("quantizer,per_channel", [("lsq", False), ("ewgs", True)])
def test_keras_round_trip_identical_logits(tmp_path, quantizer, per_channel):
    qmodel = fqat_tf.quantize_model(tiny_resnet(), weight_bits=3, activation_bits=3,
                                    quantizer=quantizer, per_channel=per_channel)
    x, _ = _data()
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  qmodel(x, training=False).numpy())
    assert [v.path for v in fqat_tf.scale_variables(loaded)] == \
        [v.path for v in fqat_tf.scale_variables(qmodel)]
    assert _configs(loaded)["block_conv1"].weight_quantizer.get_config() == \
        _configs(qmodel)["block_conv1"].weight_quantizer.get_config()


def _shortcut_through_padding():
    """A ReLU output read by the shortcut and, through padding, by a conv; a conv reading a
    tensor read by it alone; a conv reading the sum, which is also the input of the head."""
    x = keras.Input((8, 8, 3))
    h = keras.layers.ReLU(name="relu")(keras.layers.Conv2D(4, 3, padding="same",
                                                           name="stem")(x))
    r = keras.layers.ZeroPadding2D(1, name="pad")(h)
    r = keras.layers.Conv2D(4, 3, activation="relu", name="branch1")(r)
    r = keras.layers.Conv2D(4, 1, name="branch2")(r)
    s = keras.layers.Add(name="sum")([h, r])
    t = keras.layers.Conv2D(4, 1, name="after_sum")(s)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Add(name="sum2")([s, t]))
    return keras.Model(x, keras.layers.Dense(2, name="classifier")(h))


def test_shared_inputs_stored_quantizes_only_the_kernel_of_layers_reading_a_shared_tensor():
    cfg = _configs(fqat_tf.quantize_model(tiny_resnet(), weight_bits=3, activation_bits=4,
                                          shared_inputs="stored"))
    # The stem's ReLU output is read by the block and by the downsample conv.
    for name in ("block_conv1", "downsample"):
        assert isinstance(cfg[name], qc.WeightOnlyQuantizeConfig)
        assert cfg[name].input_quantizer is None and cfg[name].weight_quantizer.num_bits == 3
    assert isinstance(cfg["block_conv2"], qc.WeightInputQuantizeConfig)
    assert isinstance(cfg["conv1"], qc.InputOnlyQuantizeConfig)
    assert isinstance(cfg["classifier"], qc.NoQuantizeConfig)

    model = _shortcut_through_padding()
    cfg = _configs(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                                          shared_inputs="stored"))
    kinds = {name: type(c).__name__ for name, c in cfg.items()}
    assert kinds == {"stem": "InputOnlyQuantizeConfig",
                     "branch1": "WeightOnlyQuantizeConfig",   # reads `relu` through `pad`
                     "branch2": "WeightInputQuantizeConfig",
                     "after_sum": "WeightOnlyQuantizeConfig",
                     "classifier": "NoQuantizeConfig"}
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                                    shared_inputs="stored")
    assert [v.path for v in fqat_tf.scale_variables(qmodel)] == [
        "stem/input_step", "branch1/kernel_step", "branch2/kernel_step", "branch2/input_step",
        "after_sum/kernel_step"]
    # An override comes after the choice; the paper's default leaves every layer "full".
    cfg = _configs(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                                          shared_inputs="stored",
                                          overrides={"after_sum": "full"}))
    assert isinstance(cfg["after_sum"], qc.WeightInputQuantizeConfig)
    cfg = _configs(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4))
    assert not any(isinstance(c, qc.WeightOnlyQuantizeConfig) for c in cfg.values())
    with pytest.raises(ValueError, match="shared_inputs must be one of .* got 'shared'"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, shared_inputs="shared")


def test_weight_only_layer_survives_save_and_load(tmp_path):
    qmodel = fqat_tf.quantize_model(tiny_resnet(), weight_bits=3, activation_bits=3,
                                    shared_inputs="stored")
    x, _ = _data()
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(_configs(loaded)["downsample"], qc.WeightOnlyQuantizeConfig)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  qmodel(x, training=False).numpy())


def test_per_channel_and_ewgs_variables():
    qmodel = fqat_tf.quantize_model(tiny_resnet(), weight_bits=4, activation_bits=4,
                                    quantizer="ewgs", per_channel=True)
    w = qmodel.get_layer("block_conv2")
    assert tuple(w.weight_variables["step"].shape) == (16,)
    assert tuple(w.input_variables["step"].shape) == ()
    assert not w.weight_variables["delta"].trainable
    assert all(v.trainable for v in fqat_tf.scale_variables(qmodel))
    assert not any("delta" in v.path for v in fqat_tf.scale_variables(qmodel))


def test_depthwise_and_overrides():
    x = keras.Input((8, 8, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", name="stem")(x)
    h = keras.layers.ReLU()(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(6, 1, name="pw")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(6, activation="relu", name="fc")(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(x, out)
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                                    overrides={"pw": {"weight_bits": 8}, "f.*": "float",
                                               "head": "full"})
    cfg = _configs(qmodel)
    assert isinstance(cfg["dw"], qc.WeightInputQuantizeConfig)
    assert cfg["pw"].weight_quantizer.num_bits == 8 and cfg["pw"].input_quantizer.num_bits == 4
    assert isinstance(cfg["fc"], qc.NoQuantizeConfig)
    assert isinstance(cfg["head"], qc.WeightInputQuantizeConfig)
    assert not cfg["head"].input_quantizer.signed  # fc has a relu activation
    inp = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    assert qmodel(inp).shape == (2, 2)


def _quantized(qmodel):
    return {w.name: type(w.quantize_config).__name__ for w in quantize_wrappers(qmodel)
            if not w.quantize_config.is_float}


def test_filters_regex_and_callable_select_the_same_layers():
    model = tiny_resnet()
    by_regex = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters="^block_")
    by_callable = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                                         filters=lambda layer: layer.name.startswith("block_"))
    expected = {"block_conv1": "WeightInputQuantizeConfig",
                "block_conv2": "WeightInputQuantizeConfig"}
    assert _quantized(by_regex) == _quantized(by_callable) == expected
    # Kernel and input step of each of the two convs.
    assert len(fqat_tf.scale_variables(by_regex)) == len(fqat_tf.scale_variables(by_callable)) == 4
    # Layers left out keep a float wrapper, as the classifier does.
    assert isinstance(_configs(by_regex)["downsample"], qc.NoQuantizeConfig)
    # A list is any of its regexes, searched (not fully matched) as Keras's Model.quantize does;
    # the first conv keeps its input-only policy.
    from keras.src.quantizers.utils import should_quantize_layer

    patterns = ["^conv1$", "down"]
    listed = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters=patterns)
    assert _quantized(listed) == {"conv1": "InputOnlyQuantizeConfig",
                                  "downsample": "WeightInputQuantizeConfig"}
    assert set(_quantized(listed)) == {l.name for l in model.layers
                                       if isinstance(l, keras.layers.Conv2D)
                                       and should_quantize_layer(l, patterns)}
    assert len(fqat_tf.scale_variables(listed)) == 3


def test_filters_that_select_nothing_are_refused():
    model = tiny_resnet()
    with pytest.raises(ValueError, match=r"filters 'no_such_layer' selects no quantizable"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters="no_such_layer")

    def never(layer):
        return False

    with pytest.raises(ValueError, match="filters callable .*never selects no quantizable"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters=never)
    with pytest.raises(ValueError, match="filters must be"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters=3)
    with pytest.raises(ValueError, match=r"filters regex '\(' is invalid"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, filters=["conv", "("])


def test_unsupported_layers_are_logged_and_left_float(caplog):
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="c1")(x)
    h = keras.layers.SeparableConv2D(4, 3, name="sep")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(2, name="head")(h)
    with caplog.at_level(logging.INFO, logger="fqat_tf"):
        qmodel = fqat_tf.quantize_model(keras.Model(x, out), weight_bits=4, activation_bits=4)
    assert type(qmodel.get_layer("sep")) is keras.layers.SeparableConv2D
    assert any("sep" in r.getMessage() and "float" in r.getMessage() for r in caplog.records)


def test_bad_input():
    model = tiny_resnet()
    for bits in (1, 9):
        with pytest.raises(ValueError, match="weight_bits"):
            fqat_tf.quantize_model(model, weight_bits=bits, activation_bits=4)
        with pytest.raises(ValueError, match="activation_bits"):
            fqat_tf.quantize_model(model, weight_bits=4, activation_bits=bits)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="functional or Sequential"):
        fqat_tf.quantize_model(sub, weight_bits=4, activation_bits=4)
    with pytest.raises(ValueError, match="matches no quantizable layer"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                               overrides={"no_such_layer.*": "float"})
    with pytest.raises(ValueError, match="unknown quantize policy"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4,
                               overrides={"conv1": "half"})
    with pytest.raises(ValueError, match="unknown quantizer"):
        fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, quantizer="dorefa")


def test_sequential_model_is_accepted():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    # No conv, so no input-only layer: both hidden Dense layers quantize kernel and input.
    assert len(fqat_tf.scale_variables(qmodel)) == 4
    fqat_tf.calibrate_scales(qmodel, [np.ones((3, 6), "float32")], num_batches=1)


@pytest.mark.parametrize("dist", ["gaussian", "relu"])
def test_mse_calibration_beats_max_abs(dist):
    rng = np.random.default_rng(0)
    v = rng.normal(size=20000).astype("float32")
    signed = dist == "gaussian"
    if not signed:
        v = np.maximum(v, 0)
    q = fqat_tf.LSQQuantizer(4, signed=signed)
    step = calibration.mse_step([v[:10000], v[10000:]], q)
    max_abs_step = np.abs(v).max() / q.qrange[1]
    mse = calibration.quantization_mse(v, step, 4, signed)
    assert mse < 0.8 * calibration.quantization_mse(v, max_abs_step, 4, signed)
    # The search really is over the 100-point grid: no grid neighbour does better.
    for nb in (step * 1.03, step * 0.97):
        assert mse <= calibration.quantization_mse(v, nb, 4, signed) + 1e-9


def test_calibrate_scales_uses_float_activations():
    model = tiny_resnet()
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, per_channel=True)
    x1, _ = _data(seed=1)
    x2, _ = _data(seed=2)
    steps = fqat_tf.calibrate_scales(qmodel, [(x1, None), (x2, None)], num_batches=2)
    # Independent reference: the float source model's activation entering block_conv2.
    tap = keras.Model(model.input, model.get_layer("block_relu1").output)
    q = _configs(qmodel)["block_conv2"].input_quantizer
    want = calibration.mse_step([tap(x1, training=False), tap(x2, training=False)], q)
    np.testing.assert_allclose(steps["block_conv2"]["input"], want, rtol=1e-6)
    np.testing.assert_allclose(qmodel.get_layer("block_conv2").input_variables["step"].numpy(),
                               want, rtol=1e-6)
    kernel = model.get_layer("downsample").kernel.numpy()
    wq = _configs(qmodel)["downsample"].weight_quantizer
    np.testing.assert_allclose(steps["downsample"]["kernel"], calibration.mse_step([kernel], wq))
    assert steps["downsample"]["kernel"].shape == (16,)
    lsq = fqat_tf.calibrate_scales(qmodel, [x1], num_batches=1, method="lsq")
    np.testing.assert_allclose(lsq["block_conv1"]["kernel"],
                               2 * np.abs(model.get_layer("block_conv1").kernel.numpy()).mean(0)
                               .mean(0).mean(0) / np.sqrt(7), rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        fqat_tf.calibrate_scales(qmodel, [], num_batches=1)


def test_calibrate_scales_in_order_fits_each_step_to_the_quantized_network():
    model = tiny_resnet()
    qmodel = fqat_tf.quantize_model(model, weight_bits=3, activation_bits=3)
    x1, _ = _data(seed=1)
    x2, _ = _data(seed=2, n=5)
    floats = fqat_tf.calibrate_scales(qmodel, [x1, x2], num_batches=2)
    steps = fqat_tf.calibrate_scales(qmodel, [x1, x2], num_batches=2, source="quantized")
    configs = _configs(qmodel)
    for name in ("conv1", "block_conv1", "block_conv2", "downsample"):
        # Independent reference: what the quantized model, with every step now set, feeds the
        # layer; the steps before it are final, so its own step is the MSE fit to that input.
        tap = keras.Model(qmodel.input, qmodel.get_layer(name).input)
        want = calibration.mse_step([tap(x1, training=False), tap(x2, training=False)],
                                    configs[name].input_quantizer)
        np.testing.assert_allclose(steps[name]["input"], want, rtol=1e-6)
        np.testing.assert_allclose(qmodel.get_layer(name).input_variables["step"].numpy(), want,
                                   rtol=1e-6)
    # The first conv sees the images either way; the layers after it see quantized inputs.
    np.testing.assert_allclose(steps["conv1"]["input"], floats["conv1"]["input"], rtol=1e-6)
    assert not np.allclose(steps["block_conv2"]["input"], floats["block_conv2"]["input"],
                           rtol=1e-3)
    with pytest.raises(ValueError, match="source"):
        fqat_tf.calibrate_scales(qmodel, [x1], num_batches=1, source="int8")
