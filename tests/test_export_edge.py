"""Slow: keras.applications' edge models (random weights, 64x64 inputs) trained briefly, then
quantized at W8A8, W4A4 and W3A3 with int8 storage (at W4A4 and W3A3 also with
`shared_inputs="stored"`), a few QAT steps, and exported: the integer model agrees with the
Keras model on at least 99.5% of the top-1 predictions and holds no float tensor.

    pytest -m slow tests/test_export_edge.py -s          # one line of figures per model and width

The float model first trains on a generated 4-class task with its BatchNorms following the
batches closely (momentum 0.5), so that the statistics the exporter folds are real ones. QAT
then runs as the trainer runs it (`fqat_tf.FQATModel`, method "lsq", BatchNorm frozen, the
steps on their own optimizer), with per-channel kernel steps: per-tensor 3-bit depthwise
kernels leave these networks answering one class, and a model that answers one class agrees
with anything. The input steps are fitted in order on the quantized network
(`calibrate_scales(source="quantized")`): fitted on the float network, EfficientNetB0's deep
3-bit steps exceed the whole range of their inputs, the signal dies and the dead tensors' ranges
give convolutions requantization scales XNNPACK cannot run.
"""
import json
import time

import keras
import numpy as np
import pytest

import fqat_tf
from export import tflite as export_lib
from export import verify as verify_lib
from fqat_tf.storage import int8_storage_model

pytestmark = pytest.mark.slow

SIZE, CLASSES, BATCH = 64, 4, 32
FLOAT_STEPS, QAT_STEPS = 40, 30
QAT_LR, SCALE_LR = 1e-4, 1e-5
# Models that take pixels in [0, 255] (their own Rescaling); the others expect [-1, 1].
PIXEL_INPUT = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0")
MODELS = ("MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0",
          "ResNet50V2")
# Cells below the 99.5% agreement (BUILD_NOTES.md, known gaps); strict, so a fix shows.
KNOWN_BELOW_AGREEMENT = {
    ("EfficientNetB0", 3, "stored"): "94.3%: a requantization near a rounding boundary "
                                     "moves a value by one step, and the 3-bit layers after "
                                     "it amplify the difference",
}


def task(n, seed, pixels):
    """Noise images; the class is a brighter channel, or brighter horizontal stripes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = rng.uniform(0, 150, size=(n, SIZE, SIZE, 3)).astype("float32")
    for c in range(3):
        x[y == c, :, :, c] += 100.0
    stripes = (np.arange(SIZE) // 4) % 2 == 0
    x[np.ix_(y == 3, stripes)] += 100.0
    return (x if pixels else x / 127.5 - 1.0), y


def _compile(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])


def _batch_norms(model):
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, keras.layers.BatchNormalization)]


def _latency_ms(content, image, runs=50):
    """Median single-image latency with XNNPACK on one thread (for the record, not a check)."""
    runner = verify_lib.TFLiteModel(content, num_threads=1)
    tensor = runner.quantize_input(image)
    runner.invoke(tensor)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        runner.interpreter.invoke()
        times.append(time.perf_counter() - begin)
    return 1e3 * float(np.median(times))


@pytest.fixture(scope="module", params=MODELS)
def trained(request):
    name = request.param
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3),
                                              classes=CLASSES)
    for bn in _batch_norms(model):
        bn.momentum = 0.5
    pixels = name in PIXEL_INPUT
    x, y = task(FLOAT_STEPS * BATCH, 0, pixels)
    _compile(model, 1e-3)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    return name, model, pixels


@pytest.mark.parametrize("bits,shared_inputs", [(8, "learned"), (4, "learned"), (3, "learned"),
                                                (4, "stored"), (3, "stored")])
def test_edge_model_agreement(trained, bits, shared_inputs, tmp_path, request):
    name, model, pixels = trained
    if (name, bits, shared_inputs) in KNOWN_BELOW_AGREEMENT:
        request.applymarker(pytest.mark.xfail(strict=True,
                                              reason=KNOWN_BELOW_AGREEMENT[name, bits,
                                                                           shared_inputs]))
    start = time.time()
    keras.utils.set_random_seed(bits)
    smodel = int8_storage_model(fqat_tf.quantize_model(model, weight_bits=bits,
                                                       activation_bits=bits, per_channel=True,
                                                       shared_inputs=shared_inputs))
    x, y = task(QAT_STEPS * BATCH, bits, pixels)
    batches = [x[i:i + BATCH] for i in range(0, 4 * BATCH, BATCH)]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=len(batches), source="quantized")
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=len(batches))
    qat = fqat_tf.FQATModel(smodel, method="lsq")
    qat.compile(optimizer=keras.optimizers.Adam(QAT_LR),
                scale_optimizer=keras.optimizers.Adam(SCALE_LR),
                loss=keras.losses.SparseCategoricalCrossentropy())
    qat.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    result = export_lib.export(smodel, batches)
    path = tmp_path / "model.tflite"
    path.write_bytes(result.tflite)
    test_x, test_y = task(512, 100 + bits, pixels)
    report = verify_lib.verify(str(path), smodel, [(test_x[i:i + 64], test_y[i:i + 64])
                                                   for i in range(0, 512, 64)])
    summary = result.summary()
    float_model = export_lib.convert_float(smodel)
    int8_ms, float_ms = (_latency_ms(c, test_x[:1]) for c in (result.tflite, float_model))
    figures = {**{k: report[k] for k in ("agreement", "keras_accuracy", "tflite_accuracy",
                                         "max_logit_diff_steps")},
               "bytes": summary["bytes"], "float_bytes": len(float_model),
               "requantized": len(summary["requantized"]), "int8_ms": round(int8_ms, 3),
               "float_ms": round(float_ms, 3)}
    int4_logits = None
    if bits <= 4:
        # The same model with its 4-bit kernels in 4 bits where XNNPACK takes them.
        packed = export_lib.export(smodel, batches, weight_storage="int4")
        int4_logits = verify_lib.TFLiteModel(packed.tflite)(test_x)
        figures.update(int4_bytes=len(packed.tflite),
                       int4_kernels=len(packed.int4.int4), int8_kernels=len(packed.int4.int8),
                       int4_ms=round(_latency_ms(packed.tflite, test_x[:1]), 3),
                       int4_agreement=float(np.mean(
                           int4_logits.argmax(1) == smodel.predict(test_x, verbose=0).argmax(1))))
    figures["seconds"] = round(time.time() - start)
    print(f"\n{name} {SIZE}px W{bits}A{bits} shared inputs {shared_inputs}: "
          + json.dumps(figures, sort_keys=True))
    assert report["float_tensors"] == []
    # The predictions vary: a model that answers one class agrees trivially.
    keras_classes = smodel.predict(test_x, verbose=0).argmax(1)
    assert len(np.unique(keras_classes)) >= 2
    assert report["agreement"] >= 0.995
    if int4_logits is not None:
        # XNNPACK computes the same integers from the INT4 kernels as from the int8 ones.
        np.testing.assert_array_equal(int4_logits,
                                      verify_lib.TFLiteModel(result.tflite)(test_x))
