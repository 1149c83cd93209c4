"""`quantize_model` on the layers of keras.applications' edge models: the policy (first conv
input-only, depthwise and squeeze-excite convs quantized, the classifier float, a conv
classifier included), the signedness of inputs after the new activations, and the flattening
of nested models, fused activations and the operator-written hard-sigmoid."""
import keras
import numpy as np
import pytest

import fqat_tf
from fqat_tf import activations, quantize_configs as qc
from fqat_tf.flatten import flatten_model
from fqat_tf.quantize import QuantizeWrapper, quantize_wrappers


def _configs(qmodel):
    return {w.name: w.quantize_config for w in quantize_wrappers(qmodel)}


def mobilenet_v3_like():
    x = keras.Input((16, 16, 3))
    h = keras.layers.Rescaling(1.0 / 127.5, -1.0)(x)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(h)
    h = keras.layers.Activation("hard_swish", name="stem_hs")(
        keras.layers.BatchNormalization()(h))
    d = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    d = keras.layers.ReLU(name="dw_relu")(keras.layers.BatchNormalization()(d))
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(d)
    s = keras.layers.ReLU(name="se_relu")(keras.layers.Conv2D(8, 1, name="se_reduce")(s))
    s = keras.layers.Conv2D(16, 1, name="se_expand")(s)
    s = keras.layers.ReLU(6.0, name="se_gate")(s + 3.0) * (1.0 / 6.0)
    d = keras.layers.Multiply(name="se_mul")([d, s])
    d = keras.layers.Conv2D(16, 1, name="project")(d)
    h = keras.layers.Activation("hard_swish", name="last_hs")(d)
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    h = keras.layers.Conv2D(4, 1, name="logits")(h)
    return keras.Model(x, keras.layers.Activation("softmax", name="predictions")(
        keras.layers.Flatten()(h)))


def test_operator_hard_sigmoid_becomes_one_layer_and_the_model_computes_the_same():
    model = mobilenet_v3_like()
    assert any(not isinstance(node.operation, keras.layers.Layer)
               for nodes in model._nodes_by_depth.values() for node in nodes)
    flat = flatten_model(model)
    gate = flat.get_layer("se_gate")
    assert isinstance(gate, keras.layers.Activation) and activations.of_layer(gate) == (
        "hard_sigmoid")
    assert all(isinstance(node.operation, keras.layers.Layer)
               for nodes in flat._nodes_by_depth.values() for node in nodes)
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(flat(x), model(x), rtol=1e-5, atol=1e-6)


def test_policy_on_a_network_without_dense():
    qmodel = fqat_tf.quantize_model(mobilenet_v3_like(), weight_bits=4, activation_bits=4)
    cfg = _configs(qmodel)
    assert isinstance(cfg["stem"], qc.InputOnlyQuantizeConfig)
    # The conv that makes the logits (through a Flatten and a softmax) is the classifier.
    assert isinstance(cfg["logits"], qc.NoQuantizeConfig)
    for name in ("dw", "se_reduce", "se_expand", "project"):
        assert isinstance(cfg[name], qc.WeightInputQuantizeConfig), name
    signed = {name: c.input_quantizer.signed for name, c in cfg.items() if c.input_quantizer}
    # dw reads a hard-swish output (which dips to -0.375), se_reduce a pooled ReLU output,
    # se_expand a ReLU output, project a product of a ReLU output and a hard-sigmoid gate.
    assert signed == {"stem": True, "dw": True, "se_reduce": False, "se_expand": False,
                      "project": False}


@pytest.mark.parametrize("activation,signed", [
    ("relu6", False), ("sigmoid", False), ("softmax", False), ("hard_sigmoid", False),
    ("hard_swish", True), ("swish", True), ("tanh", True), ("linear", True)])
def test_input_signedness_after_each_activation(activation, signed):
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="first")(x)
    h = keras.layers.Activation(activation)(h)
    h = keras.layers.Conv2D(4, 3, name="second")(h)
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    cfg = _configs(fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4))
    assert cfg["second"].input_quantizer.signed == signed


def test_fused_activations_move_out_unless_tflite_fuses_them():
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu6", name="a")(x)
    h = keras.layers.Conv2D(4, 3, activation="swish", name="b")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="head")(h))
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    assert qmodel.get_layer("a").layer.activation is keras.activations.relu6
    assert qmodel.get_layer("b").layer.activation is keras.activations.linear
    assert activations.of_layer(qmodel.get_layer("b_silu")) == "silu"
    assert activations.of_layer(qmodel.get_layer("head_softmax")) == "softmax"
    assert isinstance(qmodel.get_layer("head"), QuantizeWrapper)
    assert isinstance(_configs(qmodel)["head"], qc.NoQuantizeConfig)
    xs = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    float_copy = flatten_model(model)
    np.testing.assert_allclose(float_copy(xs), model(xs), rtol=1e-5, atol=1e-6)


def test_nested_models_are_inlined_with_their_weights():
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Sequential([inner_in, keras.layers.Conv2D(4, 3, name="c1"),
                              keras.layers.ReLU(name="r1")], name="backbone")
    x = keras.Input((8, 8, 3))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(inner(x))
    model = keras.Model(x, keras.layers.Dense(2, name="head")(h))
    flat = flatten_model(model)
    assert [l.name for l in flat.layers[1:]] == ["c1", "r1", "pool", "head"]
    np.testing.assert_array_equal(flat.get_layer("c1").kernel.numpy(),
                                  inner.get_layer("c1").kernel.numpy())
    xs = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(flat(xs), model(xs), rtol=1e-6)
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    assert set(_configs(qmodel)) == {"c1", "head"}
    # A flat model needs no copy.
    assert flatten_model(flat) is flat


def test_a_shared_layer_cannot_be_flattened():
    x = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="sigmoid", name="shared")
    model = keras.Model(x, keras.layers.Dense(2)(shared(shared(x))))
    with pytest.raises(ValueError, match="'shared' is called more than once"):
        flatten_model(model)


def test_per_channel_depthwise_steps_run_over_the_output_channels():
    # A depthwise kernel [3, 3, in=4, multiplier=2] has 8 output channels (TFLite's order:
    # channel c * 2 + m), each with its own step.
    x = keras.Input((6, 6, 4))
    h = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, padding="same", name="first")(x))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(h)
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    kernel = np.random.default_rng(3).normal(size=(3, 3, 4, 2)).astype("float32")
    kernel *= np.arange(1, 9, dtype="float32").reshape(4, 2)      # channel scales 1..8
    model.get_layer("dw").kernel.assign(kernel)
    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4, per_channel=True)
    dw = qmodel.get_layer("dw")
    step = dw.weight_variables["step"].numpy()
    assert step.shape == (8,)
    # LSQ's data-free step, 2 mean|w| / sqrt(7), channel by channel.
    want = 2 * np.abs(kernel).reshape(9, 8).mean(0) / np.sqrt(7)
    np.testing.assert_allclose(step, want, rtol=1e-5)
    ints = dw.quantized_kernel().numpy() / step.reshape(4, 2)
    np.testing.assert_allclose(ints, np.round(ints), atol=1e-4)
    assert np.abs(np.round(ints)).max() <= 8
    np.testing.assert_allclose(dw.kernel_scales().numpy(), step)
    # The integer model stores those integers with those steps as per-channel scales.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from export import tflite as export_lib

    xs = np.random.default_rng(4).normal(size=(16, 6, 6, 4)).astype("float32")
    fqat_tf.calibrate_scales(qmodel, [xs], num_batches=1)
    step = dw.weight_variables["step"].numpy()
    it = Interpreter(model_content=export_lib.convert(qmodel, [xs]),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    (weights,) = [t for t in it.get_tensor_details() if t["name"].endswith("kernel_of_dw")]
    np.testing.assert_allclose(weights["quantization_parameters"]["scales"], step, rtol=1e-6)
    np.testing.assert_array_equal(it.get_tensor(weights["index"]).reshape(9, 8),
                                  np.round(dw.quantized_kernel().numpy() / step.reshape(4, 2))
                                  .reshape(9, 8))
