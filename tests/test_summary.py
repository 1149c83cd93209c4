"""quantization_summary: the table of what a quantized model quantizes."""
import re

import keras
import numpy as np

import fqat_tf


def _tiny():
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="stem")(x)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Conv2D(4, 1, name="mid")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(2, name="head")(h))


EXPECTED = "\n".join([
    "Layer  Quantized      W bits  A bits  Quantizer             Weight step          Input step",
    "-" * 91,
    "stem   input          -       3       lsq (signed input)    -                    0.5",
    "mid    weights+input  4       3       lsq (unsigned input)  0.1/0.25/0.4 (4 ch)  0.125",
    "2 quantized layers, 3 scale variables",
])


def test_summary_table_by_hand():
    qmodel = fqat_tf.quantize_model(_tiny(), weight_bits=4, activation_bits=3, per_channel=True)
    stem, mid = qmodel.get_layer("stem"), qmodel.get_layer("mid")
    stem.input_variables["step"].assign(0.5)
    mid.weight_variables["step"].assign(np.array([0.1, 0.4, 0.2, 0.3], "float32"))
    mid.input_variables["step"].assign(0.125)
    printed = []
    text = fqat_tf.quantization_summary(qmodel, print_fn=printed.append)
    assert text == EXPECTED
    assert printed == [EXPECTED]


def test_summary_of_per_tensor_ewgs_and_filtered_layers():
    qmodel = fqat_tf.quantize_model(_tiny(), weight_bits=8, activation_bits=5, quantizer="ewgs",
                                    filters="mid")
    qmodel.get_layer("mid").weight_variables["step"].assign(0.0625)
    qmodel.get_layer("mid").input_variables["step"].assign(0.25)
    lines = fqat_tf.quantization_summary(qmodel).splitlines()
    # Only "mid" is left quantized; its per-tensor step prints as one value.
    assert len(lines) == 4 and lines[-1] == "1 quantized layers, 2 scale variables"
    assert re.split(r"\s{2,}", lines[2]) == ["mid", "weights+input", "8", "5",
                                             "ewgs (unsigned input)", "0.0625", "0.25"]
