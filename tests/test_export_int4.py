"""`--weight_storage=int4`: learned 4-bit kernels stored as INT4 tensors (`export.int4`)."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import fqat_tf
from export import int4, tflite as export_lib, verify as verify_lib
import helpers
from helpers import compile_fit, make_model_run, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pack_puts_the_first_value_in_the_low_nibble():
    packed = int4.pack(np.array([-8, 7, 0, -1, 3], np.int8))
    assert packed.tolist() == [0x78, 0xF0, 0x03]


@pytest.fixture(scope="module")
def storage_resnet():
    _, smodel, x, y = helpers.storage_resnet(4)
    batches = [x[:128], x[128:256]]
    fqat_tf.calibrate_scales(smodel, batches, num_batches=2)
    fqat_tf.calibrate_ranges(smodel, batches, num_batches=2)
    compile_fit(smodel, x, y, 1e-3, 1)
    return smodel, batches


def _builtin(content, x):
    runner = verify_lib.TFLiteModel(content)
    runner.interpreter = Interpreter(
        model_content=content,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return runner(x)


def test_int4_file_is_smaller_by_half_its_4bit_kernels_and_computes_the_same(storage_resnet):
    smodel, batches = storage_resnet
    int8 = export_lib.export(smodel, batches)
    result = export_lib.export(smodel, batches, weight_storage="int4")
    learned = ("block_conv1", "block_conv2", "downsample")
    counts = {name: int(np.prod(smodel.get_layer(name).layer.kernel.shape)) for name in learned}
    summary = result.summary()
    assert summary["weight_storage"] == "int4"
    assert summary["int4_kernels"] == counts == {"block_conv1": 576, "block_conv2": 1152,
                                                 "downsample": 128}
    # The first conv and the classifier train on their int8 grids.
    assert set(summary["int8_kernels"]) == {"conv1", "classifier"}
    assert sorted(summary["int4_outside_xnnpack"]) == sorted(learned)
    # Two weights a byte: each kernel of n elements saves n // 2 bytes, nothing else changes.
    assert len(int8.tflite) - len(result.tflite) == sum(n // 2 for n in counts.values()) == 928
    # The built-in kernels compute the same integers from either storage.
    test_x = task(256, 9)[0]
    np.testing.assert_array_equal(_builtin(result.tflite, test_x), _builtin(int8.tflite, test_x))
    # With XNNPACK (which runs the int8 convs itself) the two agree on the predictions.
    report = verify_lib.TFLiteModel(result.tflite)(test_x).argmax(1)
    assert np.mean(report == verify_lib.TFLiteModel(int8.tflite)(test_x).argmax(1)) >= 0.99
    assert verify_lib.float_tensors(result.tflite) == []


def _partitions(content):
    it = Interpreter(model_content=content)
    it.allocate_tensors()
    return [op["op_name"] for op in it._get_ops_details()].count("DELEGATE")


@pytest.mark.parametrize("layer,delegated", [("fc", True), ("conv", False), ("dw", False)])
def test_xnnpack_takes_int4_weights_of_fully_connected_only(layer, delegated):
    # `export.int4.XNNPACK_INT4_OPS` as the runtime shows it: a 4-bit FULLY_CONNECTED stays
    # in the delegate's one partition, a 4-bit conv splits it.
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 8))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="first")(inputs)
    if layer == "conv":
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="x")(h)
    if layer == "dw":
        h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="x")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    if layer == "fc":
        h = keras.layers.Dense(8, activation="relu", name="x")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    x = np.random.default_rng(1).normal(size=(32, 6, 6, 8)).astype("float32")
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    plain = export_lib.export(qmodel, [x])
    packed = export_lib.export(qmodel, [x], weight_storage="int4")
    assert list(packed.summary()["int4_kernels"]) == ["x"]
    assert (packed.summary()["int4_outside_xnnpack"] == []) == delegated
    assert _partitions(plain.tflite) == 1
    assert _partitions(packed.tflite) == (1 if delegated else 2)
    np.testing.assert_array_equal(_builtin(packed.tflite, x), _builtin(plain.tflite, x))


def test_unknown_weight_storage_is_refused(storage_resnet):
    smodel, batches = storage_resnet
    with pytest.raises(export_lib.ExportError, match="weight_storage='int2'"):
        export_lib.export(smodel, batches, weight_storage="int2")


def test_command_line_writes_an_int4_model(tmp_path):

    run = make_model_run(str(tmp_path / "run"))
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
    # tiny_cnn: conv2 (3x3x8x8) is the one learned kernel.
    assert outs["int4"]["int4_kernels"] == {"conv2": 576}
    assert outs["int8"]["bytes"] - outs["int4"]["bytes"] == 288
    bad = subprocess.run([sys.executable, "-m", "export.tflite", run, "--out",
                          str(tmp_path / "x.tflite"), "--weight_storage=int2"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--weight_storage" in bad.stderr
    assert not (tmp_path / "x.tflite").exists()
