"""The blocks of MobileNetV2/V3, EfficientNet and ResNetV2, one small model each: trained with
int8 storage (`fqat_tf.storage.int8_storage_model`), exported, and run in the interpreter, the
integer model agrees with the Keras model on at least 99.5% of the predictions and holds no
float tensor."""
import collections

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import fqat_tf
from export import tflite as export_lib, verify as verify_lib
from fqat_tf import affine, defaults
from fqat_tf.storage import (StoragePlan, UnsupportedLayerError, int8_storage_model,
                             sync_input_scales)

NUM_CLASSES = 4
SIZE = 16


def task(n, seed):
    """Pixel images in [0, 255]; the class is a brighter channel, or a brighter top half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = rng.uniform(0, 160, size=(n, SIZE, SIZE, 3)).astype("float32")
    for c in range(3):
        x[y == c, :, :, c] += 90.0
    x[y == 3, : SIZE // 2] += 90.0
    return x, y


def _stem(x, filters=8, name="stem"):
    """Pixels scaled to [-1, 1] and a first conv with BatchNorm (its input is quantized)."""
    h = keras.layers.Rescaling(1.0 / 127.5, -1.0, name=f"{name}_scale")(x)
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(h)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(h)


def _head(h, activation="softmax"):
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.layers.Dense(NUM_CLASSES, activation=activation, name="predictions")(h)


def inverted_residual():
    """MobileNetV2: expand, ReLU6, padded stride-1 depthwise, project, residual sum."""
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.ReLU(6.0, name="stem_relu6")(_stem(x))
    r = keras.layers.Conv2D(24, 1, use_bias=False, name="expand")(h)
    r = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(name="expand_bn")(r))
    r = keras.layers.ZeroPadding2D(1)(r)
    r = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(r)
    r = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(name="dw_bn")(r))
    r = keras.layers.Conv2D(8, 1, use_bias=False, name="project")(r)
    r = keras.layers.BatchNormalization(name="project_bn")(r)
    return keras.Model(x, _head(keras.layers.Add()([h, r])))


def hard_swish_squeeze_excite():
    """MobileNetV3: hard-swish, and a squeeze-excite gate `relu6(x + 3) / 6` written with
    operators, as keras.applications writes it; a conv classifier, flattened, softmax."""
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Activation("hard_swish", name="stem_hs")(_stem(x, 16))
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    s = keras.layers.ReLU()(keras.layers.Conv2D(8, 1, name="se_reduce")(s))
    s = keras.layers.Conv2D(16, 1, name="se_expand")(s)
    s = keras.layers.ReLU(6.0)(s + 3.0) * (1.0 / 6.0)
    h = keras.layers.Multiply(name="se_mul")([h, s])
    h = keras.layers.Conv2D(16, 1, use_bias=False, name="project")(h)
    h = keras.layers.Activation("hard_swish")(keras.layers.BatchNormalization(name="p_bn")(h))
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    h = keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")(h)
    return keras.Model(x, keras.layers.Activation("softmax")(keras.layers.Flatten()(h)))


def swish_squeeze_excite():
    """EfficientNet: Rescaling then Normalization at the input, swish, a squeeze-excite with
    a swish and a sigmoid fused into its convs, a residual sum."""
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Rescaling(1.0 / 255.0)(x)
    h = keras.layers.Normalization(mean=[0.45, 0.4, 0.5], variance=[0.06, 0.05, 0.07])(h)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(h)
    h = keras.layers.Activation("swish")(keras.layers.BatchNormalization(name="stem_bn")(h))
    d = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    d = keras.layers.Activation("swish")(keras.layers.BatchNormalization(name="dw_bn")(d))
    s = keras.layers.Reshape((1, 1, 16))(keras.layers.GlobalAveragePooling2D()(d))
    s = keras.layers.Conv2D(4, 1, activation="swish", name="se_reduce")(s)
    s = keras.layers.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    d = keras.layers.Multiply(name="se_mul")([d, s])
    d = keras.layers.Conv2D(16, 1, use_bias=False, name="project")(d)
    d = keras.layers.BatchNormalization(name="project_bn")(d)
    return keras.Model(x, _head(keras.layers.Add()([d, h])))


def pre_activation():
    """ResNetV2: BatchNorm and ReLU before each block (a standalone per-channel affine), a
    1x1 max-pooled stride-2 shortcut, a final BatchNorm and ReLU."""
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", name="stem")(_scaled(x))
    for i, stride in enumerate((1, 2)):
        p = keras.layers.BatchNormalization(name=f"preact{i}")(h)
        p = keras.layers.Activation("relu")(p)
        r = keras.layers.Conv2D(16, 3, strides=stride, padding="same", use_bias=False,
                                name=f"conv{i}")(p)
        r = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name=f"bn{i}")(r))
        r = keras.layers.Conv2D(16, 1, name=f"out{i}")(r)
        shortcut = keras.layers.MaxPooling2D(1, strides=stride)(h) if stride > 1 else h
        h = keras.layers.Add()([shortcut, r])
    h = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="post_bn")(h))
    return keras.Model(x, _head(h))


def _scaled(x):
    return keras.layers.Rescaling(1.0 / 127.5, -1.0)(x)


def concatenation_and_tanh():
    """Two branches concatenated (one of them a tanh), a sigmoid head."""
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.ReLU()(_stem(x))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="branch_a")(h)
    b = keras.layers.Conv2D(8, 1, name="branch_b")(h)
    b = keras.layers.Activation("tanh")(keras.layers.BatchNormalization(name="b_bn")(b))
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="after")(h)
    return keras.Model(x, _head(h, activation="sigmoid"))


def nested_backbone():
    """A functional backbone called inside the model, as keras.applications models are."""
    inner_in = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.ReLU()(_stem(inner_in))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    backbone = keras.Model(inner_in, h, name="backbone")
    x = keras.Input((SIZE, SIZE, 3))
    return keras.Model(x, _head(backbone(x)))


BLOCKS = {f.__name__: f for f in (inverted_residual, hard_swish_squeeze_excite,
                                  swish_squeeze_excite, pre_activation, concatenation_and_tanh,
                                  nested_backbone)}


def _fit(model, x, y, lr, epochs):
    probabilities = model.layers[-1].get_config().get("activation") in ("softmax", "sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=not probabilities))
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


def trained_storage_model(name, bits, shared_inputs=defaults.SHARED_INPUTS):
    keras.utils.set_random_seed(0)
    model = BLOCKS[name]()
    x, y = task(512, 0)
    _fit(model, x, y, 1e-2, 4)
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=bits,
                                                       activation_bits=bits,
                                                       shared_inputs=shared_inputs))
    batches = [x[:128], x[128:256]]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=2)
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=2)
    _fit(smodel, x, y, 1e-3, 1)
    return smodel, batches


def _op_details(content):
    it = Interpreter(model_content=content,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it._get_ops_details()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_trained_with_int8_storage_exports_to_a_matching_integer_model(name, tmp_path):
    smodel, batches = trained_storage_model(name, 4)
    result = export_lib.export(smodel, batches)
    assert result.trained_ranges == len(result.ranges) > 0
    path = tmp_path / "m.tflite"
    path.write_bytes(result.tflite)
    test_x, test_y = task(512, 1)
    report = verify_lib.verify(str(path), smodel, [(test_x, test_y)])
    assert report["float_tensors"] == []
    assert report["keras_accuracy"] > 0.6          # the model learned something
    assert report["agreement"] >= 0.995, report


OPS = {
    "hard_swish_squeeze_excite": {"HARD_SWISH", "MUL", "SOFTMAX", "DEPTHWISE_CONV_2D"},
    "swish_squeeze_excite": {"LOGISTIC", "MUL", "SOFTMAX"},
    "concatenation_and_tanh": {"CONCATENATION", "TANH", "LOGISTIC"},
    "pre_activation": {"DEPTHWISE_CONV_2D", "SOFTMAX"},
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_block_runs_on_tflites_int8_kernels(name):
    smodel, batches = trained_storage_model(name, 4)
    ops = collections.Counter(op["op_name"] for op in _op_details(
        export_lib.export(smodel, batches).tflite))
    assert OPS[name] <= set(ops)
    # No clip op: saturation clips every learned grid (the first conv's signed one, whose
    # input has no bound, on two tensors).
    assert ops["MINIMUM"] == 0 and ops["MAXIMUM"] == 0


def test_shared_inputs_stored_reads_the_residual_sums_input_with_no_requantizing_op(tmp_path):
    # MobileNetV2's block input is read by the expand conv and by the residual sum. With its
    # own learned grid the expand conv reads a requantized copy (one MUL more); reading the
    # tensor as stored, it takes the very tensor the ADD takes. The one MUL left clips the
    # first conv's signed 3-bit input, which no saturation of an int8 model input can do.
    learned, batches = trained_storage_model("inverted_residual", 3)
    stored, _ = trained_storage_model("inverted_residual", 3, shared_inputs="stored")
    assert StoragePlan(learned).requantized == ["expand"]
    assert StoragePlan(stored).requantized == []
    ops = {}
    for name, model in (("learned", learned), ("stored", stored)):
        ops[name] = _op_details(export_lib.export(model, batches).tflite)
    count = {k: collections.Counter(op["op_name"] for op in v) for k, v in ops.items()}
    assert count["learned"]["MUL"] == 2 and count["stored"]["MUL"] == 1
    assert count["learned"] - collections.Counter(MUL=1) == count["stored"]
    (add,) = [op for op in ops["stored"] if op["op_name"] == "ADD"]
    readers = [op for op in ops["stored"] if op["op_name"] == "CONV_2D"
               and op["inputs"][0] in add["inputs"]]
    assert len(readers) == 1                # the expand conv
    result = export_lib.export(stored, batches)
    path = tmp_path / "m.tflite"
    path.write_bytes(result.tflite)
    test_x, test_y = task(512, 1)
    report = verify_lib.verify(str(path), stored, [(test_x, test_y)])
    assert report["float_tensors"] == []
    assert report["keras_accuracy"] > 0.6
    assert report["agreement"] >= 0.995, report


def test_a_conv_reading_its_input_as_stored_rounds_its_bias_on_that_inputs_grid(tmp_path):
    # Its input scale is the range another layer keeps: `calibrate_ranges` and
    # `sync_input_scales` copy it in (here after the ranges moved in training), and the folded
    # bias then lies on TFLite's int32 grid (input scale x kernel step x |BN factor|).
    smodel, batches = trained_storage_model("inverted_residual", 3, shared_inputs="stored")
    expand = smodel.get_layer("expand")
    assert expand.reads_stored_input
    sync_input_scales(smodel)
    scale = float(expand.input_storage_scale.numpy())
    assert scale == StoragePlan(smodel).stored_input_scales()["expand"] > 0.0
    f = keras.ops.convert_to_numpy(
        affine.batchnorm_affine(expand.batchnorm)[0]).astype(np.float64)
    grid = np.float64(np.float32(scale)) * np.float64(
        expand.kernel_scales().numpy()) * np.abs(np.float32(f))
    ints = expand.folded_bias().numpy().astype(np.float64) / grid
    np.testing.assert_allclose(ints, np.round(ints), rtol=0, atol=1e-3)
    expand.input_storage_scale.assign(0.0)            # not synced: the bias stays float
    ints = expand.folded_bias().numpy().astype(np.float64) / grid
    assert np.abs(ints - np.round(ints)).max() > 0.01
    # A range that moved after calibration: the export gives the layer the current scale.
    expand.input_storage_scale.assign(scale * 1.5)
    export_lib.export(smodel, batches)
    assert float(expand.input_storage_scale.numpy()) == scale
    expand.input_storage_scale.assign(scale * 1.5)
    sync_input_scales(smodel)
    assert float(expand.input_storage_scale.numpy()) == scale
    path = str(tmp_path / "m.keras")
    smodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert float(loaded.get_layer("expand").input_storage_scale.numpy()) == scale
    x = task(32, 5)[0]
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  smodel(x, training=False).numpy())


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_of_the_papers_recipe_exports_integer(name):
    # Without int8 storage the export still holds no float tensor; the Keras model keeps
    # float what the integer model stores in 8 bits, so agreement is lower.
    keras.utils.set_random_seed(0)
    model = BLOCKS[name]()
    x, y = task(384, 0)
    _fit(model, x, y, 1e-2, 3)
    qmodel = fqat_tf.quantize_model(model, weight_bits=8, activation_bits=8)
    fqat_tf.calibrate_scales(qmodel, [x[:128]], num_batches=1)
    result = export_lib.export(qmodel, [x[:128], x[128:256]])
    assert result.trained_ranges == 0 and result.ranges
    assert verify_lib.float_tensors(result.tflite) == []
    test_x = task(256, 2)[0]
    keras_top = qmodel(test_x, training=False).numpy().argmax(1)
    assert np.mean(verify_lib.TFLiteModel(result.tflite)(test_x).argmax(1) == keras_top) >= 0.9


def test_an_activation_without_int8_kernel_is_named():
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Activation("gelu", name="odd")(_stem(x))
    qmodel = fqat_tf.quantize_model(keras.Model(x, _head(h)), weight_bits=4, activation_bits=4)
    message = "'odd' \\(Activation\\) cannot be kept integer: activation 'gelu' has no int8 kernel"
    with pytest.raises(UnsupportedLayerError, match=message):
        int8_storage_model(qmodel)
    with pytest.raises(UnsupportedLayerError, match=message):
        export_lib.export(qmodel, [task(8, 0)[0]])
    result = export_lib.export(qmodel, [task(8, 0)[0]], allow_float=True)
    assert result.float_layers == ["odd (Activation: activation 'gelu' has no int8 kernel here)"]


def test_storage_model_survives_save_and_load_in_a_fresh_process(tmp_path):
    # `import fqat_tf` alone registers every int8 storage layer (Int8Activation, Int8Affine).
    import os
    import subprocess
    import sys

    smodel, _ = trained_storage_model("swish_squeeze_excite", 4)
    kinds = {type(l).__name__ for l in smodel.layers}
    assert {"Int8Activation", "Int8Affine", "RangeQuantize"} <= kinds
    path, images = str(tmp_path / "m.keras"), str(tmp_path / "x.npy")
    smodel.save(path)
    x = task(16, 3)[0]
    np.save(images, x)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, numpy as np, keras, fqat_tf; "
            "m = keras.saving.load_model(sys.argv[1], safe_mode=True); "
            "np.save(sys.argv[3], m(np.load(sys.argv[2]), training=False).numpy())")
    out = str(tmp_path / "y.npy")
    proc = subprocess.run([sys.executable, "-c", code, path, images, out], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(out), smodel(x, training=False).numpy())
