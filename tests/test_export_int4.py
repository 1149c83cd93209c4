"""`--weight_storage=int4`: learned 4-bit kernels stored as INT4 tensors (`export.int4`)."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import fqat_tf
from export import int4, tflite as export_lib, verify as verify_lib
from fqat_tf.storage import int8_storage_model
from helpers import builtin_outputs, compile_fit, make_model_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pack_puts_the_first_value_in_the_low_nibble():
    packed = int4.pack(np.array([-8, 7, 0, -1, 3], np.int8))
    assert packed.tolist() == [0x78, 0xF0, 0x03]


def pointwise_cnn():
    """28x28x1: a stem conv, a 1x1 conv, a 3x3 conv, a hidden Dense and the classifier."""
    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(16, 1, activation="relu", name="pointwise")(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu",
                            name="spatial")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(12, activation="relu", name="hidden")(h)
    return keras.Model(x, keras.layers.Dense(10, name="classifier")(h))


@pytest.fixture(scope="module")
def storage_cnn():
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(256, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=256)
    smodel = int8_storage_model(fqat_tf.quantize_model(pointwise_cnn(), weight_bits=4,
                                                       activation_bits=4, per_channel=True))
    batches = [x[:128], x[128:]]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=2, source="quantized")
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=2)
    compile_fit(smodel, x, y, 1e-3, 1)
    return smodel, batches


def _partitions(content):
    it = Interpreter(model_content=content)
    it.allocate_tensors()
    return [op["op_name"] for op in it._get_ops_details()].count("DELEGATE")


def test_int4_where_xnnpack_runs_it_computes_exactly_the_int8_file(storage_cnn):
    smodel, batches = storage_cnn
    int8 = export_lib.export(smodel, batches)
    result = export_lib.export(smodel, batches, weight_storage="int4")
    summary = result.summary()
    assert summary["weight_storage"] == "int4"
    counts = {"pointwise": 8 * 16, "hidden": 8 * 12}
    assert summary["int4_kernels"] == counts
    # A per-channel Dense is exported as a 1x1 conv (`export.layers`), and rewritten back.
    assert summary["int4_as_fully_connected"] == ["pointwise", "hidden"]
    # The first conv and the classifier train on their int8 grids; a 3x3 conv has no INT4
    # kernel in XNNPACK.
    reasons = summary["int8_kernels"]
    assert set(reasons) == {"conv1", "spatial", "classifier"}
    assert "need 8 bits" in reasons["conv1"] and "need 8 bits" in reasons["classifier"]
    assert reasons["spatial"].startswith("CONV_2D 3x3: XNNPACK takes INT4 weights only")
    # Two weights a byte: each kernel of n elements saves n // 2 bytes, give or take the
    # rewritten ops' options, an operator code and the flatbuffer's alignment.
    saved, halves = len(int8.tflite) - len(result.tflite), sum(n // 2 for n in counts.values())
    assert abs(saved - halves) <= 32
    # XNNPACK runs the whole file (one partition) and computes the int8 file's integers.
    assert _partitions(result.tflite) == _partitions(int8.tflite) == 1
    test_x = np.random.default_rng(9).uniform(0, 1, size=(64, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(verify_lib.TFLiteModel(result.tflite)(test_x),
                                  verify_lib.TFLiteModel(int8.tflite)(test_x))
    # So do LiteRT's built-in kernels (a dense layer's FULLY_CONNECTED rounds as a 1x1 conv).
    np.testing.assert_array_equal(builtin_outputs(result.tflite, test_x),
                                  builtin_outputs(int8.tflite, test_x))
    assert verify_lib.float_tensors(result.tflite) == []


@pytest.mark.parametrize("layer,packed", [("dense", True), ("pointwise", True),
                                          ("strided", False), ("conv", False), ("dw", False)])
def test_int4_kernels_are_the_ones_xnnpack_takes(layer, packed):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 8))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="first")(inputs)
    if layer == "pointwise":
        h = keras.layers.Conv2D(8, 1, activation="relu", name="x")(h)
    if layer == "strided":
        h = keras.layers.Conv2D(8, 1, strides=2, activation="relu", name="x")(h)
    if layer == "conv":
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="x")(h)
    if layer == "dw":
        h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="x")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    if layer == "dense":
        h = keras.layers.Dense(8, activation="relu", name="x")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    x = np.random.default_rng(1).normal(size=(32, 6, 6, 8)).astype("float32")
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    plain = export_lib.export(qmodel, [x])
    result = export_lib.export(qmodel, [x], weight_storage="int4")
    assert ("x" in result.summary()["int4_kernels"]) == packed
    assert ("XNNPACK" in result.summary()["int8_kernels"].get("x", "")) == (not packed)
    assert _partitions(result.tflite) == _partitions(plain.tflite) == 1
    np.testing.assert_array_equal(verify_lib.TFLiteModel(result.tflite)(x),
                                  verify_lib.TFLiteModel(plain.tflite)(x))


def test_unknown_weight_storage_is_refused(storage_cnn):
    smodel, batches = storage_cnn
    with pytest.raises(export_lib.ExportError, match="weight_storage='int2'"):
        export_lib.export(smodel, batches, weight_storage="int2")


def test_command_line_writes_an_int4_model(tmp_path):

    run = make_model_run(str(tmp_path / "run"), pointwise_cnn())
    outs = {}
    for storage in ("int8", "int4"):
        out = tmp_path / f"{storage}.tflite"
        proc = subprocess.run(
            [sys.executable, "-m", "export.tflite", run, "--out", str(out),
             "--representative_batches", "1", f"--weight_storage={storage}"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs[storage] = json.loads(proc.stdout)
        assert outs[storage]["bytes"] == out.stat().st_size
    assert outs["int4"]["int4_kernels"] == {"pointwise": 128, "hidden": 96}
    assert outs["int4"]["int4_as_fully_connected"] == ["pointwise"]
    assert abs(outs["int8"]["bytes"] - outs["int4"]["bytes"] - 112) <= 32
    bad = subprocess.run([sys.executable, "-m", "export.tflite", run, "--out",
                          str(tmp_path / "x.tflite"), "--weight_storage=int2"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--weight_storage" in bad.stderr
    assert not (tmp_path / "x.tflite").exists()
