"""Where a learned b-bit grid sits in its int8 tensor (`ExportGraph.layout`): at the top where
the graph proves the values never fall below the grid's minimum, so that int8 saturation clips
and no MINIMUM/MAXIMUM op splits the XNNPACK graph; at the bottom otherwise, its top clipped by a
tensor before it."""
import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import fqat_tf
from export import tflite as export_lib, verify as verify_lib
from export.emitter import Layout
from export.graph import ExportGraph
from fqat_tf.storage import Spec, int8_storage_model


def _model(activation):
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="first")(x)
    h = keras.layers.Activation(activation, name="act")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", name="second")(h)
    return keras.Model(x, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))


def _ops(content):
    it = Interpreter(model_content=content,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return [op["op_name"] for op in it._get_ops_details()]


def test_unsigned_grid_on_a_relu_output_sits_at_the_top():
    graph = ExportGraph(fqat_tf.quantize_model(_model("relu"), weight_bits=4, activation_bits=4))
    spec = Spec(0.25, 0, 15)
    assert graph.layout("act", spec, {}) == Layout(15 - 255, 15, clip_hi=False)
    # The model input has no bound: its signed grid sits at the bottom, clipped at the top.
    assert graph.layout("(input)", Spec(0.1, -8, 7), {}) == Layout(-8, 247, clip_hi=True)
    # An 8-bit grid fills the int8 tensor.
    assert graph.layout("(input)", Spec(0.1, -128, 127), {}) == Layout(-128, 127, False)


@pytest.mark.parametrize("step,top", [(0.1, True), (0.04, False)])
def test_signed_grid_on_a_hard_swish_output_sits_at_the_top_when_its_minimum_is_lower(step,
                                                                                      top):
    # hard_swish >= -0.375, less half a step of the grid it is rounded onto: its own range
    # here, [-0.4, 3.425] (step 0.015). A 4-bit grid reaches -8 * step: -0.8 holds it,
    # -0.32 does not.
    graph = ExportGraph(fqat_tf.quantize_model(_model("hard_swish"), weight_bits=4,
                                               activation_bits=4))
    assert graph.plan.bounds("act").lo == -0.375
    ranges = {"act": (-0.4, 3.425)}
    layout = graph.layout("act", Spec(step, -8, 7), ranges, requantized=True)
    assert layout == (Layout(7 - 255, 7, False) if top else Layout(-8, 247, True))


def test_relu_network_exports_without_clip_ops_and_matches_its_keras_model():
    keras.utils.set_random_seed(0)
    qmodel = int8_storage_model(fqat_tf.quantize_model(_model("relu"), weight_bits=4,
                                                       activation_bits=4))
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    fqat_tf.calibrate_ranges(qmodel, [x], num_batches=1)
    content = export_lib.convert(qmodel, [x])
    ops = _ops(content)
    # No clip op at all: the first conv's signed input grid is clipped by saturation on two
    # tensors (one more MUL), the ReLU output's by one.
    assert "MINIMUM" not in ops and "MAXIMUM" not in ops
    it = Interpreter(model_content=content)
    it.allocate_tensors()
    # The conv with its fused ReLU writes the 4-bit grid at the top of int8: zero point
    # 127 - 15, so that 15 steps is the int8 maximum.
    (relu_out,) = [t for t in it.get_tensor_details()
                   if t["dtype"] == np.int8 and t["quantization"][1] == 127 - 15]
    step = qmodel.get_layer("second").input_variables["step"].numpy()
    assert relu_out["quantization"][0] == pytest.approx(step)
    # With int8 storage the Keras model is the integer model but for the rounding of sums
    # that land next to a boundary: a logit here and there one step off.
    keras_out = qmodel(x, training=False).numpy()
    steps = np.abs(verify_lib.TFLiteModel(content)(x) - keras_out) / verify_lib.output_step(
        content)
    assert np.mean(steps < 0.5) > 0.95 and steps.max() < 1.5
