"""Slow: int8 TFLite export of a ResNet-18 (width 64) trained on RotatedMNIST, at W8A8, W4A4
and W3A3, against its Keras fake-quant model on the held-out 75-degree domain; with the paper's
recipe and with int8 storage in training (`fqat_tf.storage.int8_storage_model`).

    pytest -m slow tests/test_export_resnet18.py -s

Float training first (BatchNorm in training mode, so its moving statistics are real and the
folding has work to do), then for each bit width: quantize, MSE calibration, QAT with Keras'
`fit`, export with the training stream as representative data, run in the interpreter.
"""
import json

import keras
import numpy as np
import pytest

import fqat_tf
from export import tflite as export_lib
from export import verify as verify_lib
from fqat_tf import data, models
from fqat_tf.storage import int8_storage_model

pytestmark = pytest.mark.slow

ERM_STEPS, QAT_STEPS = 300, 100
FLAGS = {"dataset": "rotated_mnist_5k", "data_dir": None, "test_domains": ["75"], "seed": 0,
         "holdout_fraction": 0.2, "batch_per_domain": 16}


def _compile(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    splits = export_lib.load_splits(FLAGS)
    stream = data.train_stream(splits, FLAGS["batch_per_domain"], seed=0, augment=False)
    model = models.resnet18(10, input_shape=(28, 28, 1), width=64)
    _compile(model, 1e-3)
    model.fit(stream, steps_per_epoch=ERM_STEPS, epochs=1, verbose=0)
    return splits, stream, model


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("storage", [False, True], ids=["recipe", "int8_storage"])
def test_resnet18_agreement(trained, bits, storage, tmp_path):
    splits, stream, model = trained
    keras.utils.set_random_seed(bits)
    representative = export_lib.representative_batches(FLAGS)
    qmodel = fqat_tf.quantize_model(model, weight_bits=bits, activation_bits=bits)
    if storage:
        qmodel = int8_storage_model(qmodel)
    fqat_tf.calibrate_scales(qmodel, representative, num_batches=len(representative))
    fqat_tf.calibrate_ranges(qmodel, representative, num_batches=len(representative))
    _compile(qmodel, 1e-4)
    qmodel.fit(stream, steps_per_epoch=QAT_STEPS, epochs=1, verbose=0)
    # The learned BatchNorm statistics are what the exporter folds (with int8 storage the
    # BatchNorm lives in its conv's wrapper).
    bn = (qmodel.get_layer("layer1_0_conv1").batchnorm if storage
          else qmodel.get_layer("layer1_0_bn1"))
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)
    result = export_lib.export(qmodel, representative)
    path = tmp_path / "model.tflite"
    path.write_bytes(result.tflite)
    test = data.eval_streams(splits, 64)["test"]["75"]
    report = verify_lib.verify(str(path), qmodel, test)
    print(f"\nresnet18 width 64 W{bits}A{bits} int8_storage={storage}: " + json.dumps(
        {**report, **result.summary()}, sort_keys=True))
    assert report["float_tensors"] == []
    assert report["keras_accuracy"] > 0.8
    assert abs(report["tflite_accuracy"] - report["keras_accuracy"]) <= 0.015
    # With the paper's recipe the 99% target holds at W8A8 only. At 4 and 3 bits this model is
    # itself that sensitive: noise of 0.001 on its input images (a quarter of a grey level)
    # changes 1-1.5% of its test predictions, 0.004 changes 3.5%; the int8 first conv's
    # weights and the 8-bit storage of the tensors the recipe keeps float make the gap. Trained
    # with that storage the Keras model is the integer model.
    assert report["agreement"] >= (0.99 if storage else {8: 0.99, 4: 0.96, 3: 0.93}[bits])
