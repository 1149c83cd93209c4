"""QuantizeWrapper: one layer-type-agnostic wrapper, found under its old names, loadable from
models saved before it had a module of its own."""
import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import fqat_tf
from fqat_tf import quantize, quantize_configs as qc, quantizers, wrapper


def test_one_class_under_every_public_name():
    assert fqat_tf.QuantizeWrapper is quantize.QuantizeWrapper is wrapper.QuantizeWrapper
    assert keras.saving.get_registered_name(wrapper.QuantizeWrapper) == "fqat_tf>QuantizeWrapper"


def test_a_new_layer_type_is_one_kernel_ops_entry(monkeypatch):
    # Conv1D is no type the wrapper was written for: registering its ops is all it takes.
    monkeypatch.setitem(qc.KERNEL_OPS, keras.layers.Conv1D, qc.KERNEL_OPS[keras.layers.Conv2D])
    conv = keras.layers.Conv1D(3, 2, use_bias=False)
    conv.build((None, 5, 2))
    kernel = np.random.default_rng(0).normal(size=(2, 2, 3)).astype("float32")
    conv.kernel.assign(kernel)
    cfg = qc.WeightInputQuantizeConfig(quantizers.LSQQuantizer(4, signed=True),
                                       quantizers.LSQQuantizer(4, signed=True))
    w = wrapper.QuantizeWrapper(conv, cfg)
    x = np.random.default_rng(1).normal(size=(2, 5, 2)).astype("float32")
    w.build(x.shape)
    w.weight_variables["step"].assign(0.25)
    w.input_variables["step"].assign(0.5)
    # Independent computation: both operands on their grids by hand, then a plain Conv1D.
    xq = np.clip(np.round(x / 0.5), -8, 7) * 0.5
    kq = np.clip(np.round(kernel / 0.25), -8, 7) * 0.25
    expected = tf.nn.conv1d(xq, kq, 1, "VALID").numpy()
    np.testing.assert_allclose(w(x).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_an_unknown_layer_type_is_refused_by_name():
    sep = keras.layers.SeparableConv2D(2, 3, name="sep")
    with pytest.raises(ValueError, match="SeparableConv2D \\(layer 'sep'\\)"):
        wrapper.QuantizeWrapper(sep, qc.NoQuantizeConfig())


def test_a_model_saved_with_the_old_module_path_loads(tmp_path):
    x = keras.Input((4,))
    h = keras.layers.Dense(3, activation="relu", name="fc")(x)
    qmodel = fqat_tf.quantize_model(keras.Model(x, keras.layers.Dense(2, name="head")(h)),
                                    weight_bits=4, activation_bits=4)
    new, old = tmp_path / "new.keras", tmp_path / "old.keras"
    qmodel.save(new)
    # A file saved while the class lived in fqat_tf.quantize names that module.
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert '"module": "fqat_tf.wrapper"' in text
                data = text.replace('"module": "fqat_tf.wrapper"',
                                    '"module": "fqat_tf.quantize"').encode()
                json.loads(data)
            dst.writestr(item, data)
    loaded = keras.saving.load_model(old, safe_mode=True)
    inputs = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(loaded(inputs).numpy(), qmodel(inputs).numpy())
    assert isinstance(loaded.get_layer("fc"), wrapper.QuantizeWrapper)
