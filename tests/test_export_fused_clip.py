"""A signed grid's lower bound clipped by a RELU_N1_TO_1 fused into the op before it, instead
of a MUL (`export.fused_clip`): the same integers in every tensor, fewer ops."""
import collections

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import fqat_tf
from export import flatbuffer, fused_clip, tflite as export_lib
from export.verify import TFLiteModel
from fqat_tf.storage import int8_storage_model

SIZE = 12


def _signed_grids():
    """Three signed grids read by convolutions: `stem` (linear) read by the 1x1 `mix` and by
    the residual sum, so stored at 8 bits and requantized onto `mix`'s grid; `mix` (linear)
    read by the depthwise `spatial` alone; and the image, read by `stem`."""
    x = keras.Input((SIZE, SIZE, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x)
    a = keras.layers.BatchNormalization(name="stem_bn")(a)
    m = keras.layers.Conv2D(8, 1, name="mix")(a)
    p = keras.layers.DepthwiseConv2D(3, padding="same", name="spatial")(m)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([a, p]))
    return keras.Model(x, keras.layers.Dense(4, name="classifier")(h))


@pytest.fixture(scope="module")
def files():
    """`(fused export, the same export with the clip MULs kept, input batches)` at W4A4."""
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(32, SIZE, SIZE, 3)).astype("float32") for _ in range(2)]
    model = int8_storage_model(fqat_tf.quantize_model(_signed_grids(), weight_bits=4,
                                                      activation_bits=4, per_channel=True))
    fqat_tf.calibrate_scales(model, batches, num_batches=2, source="quantized")
    fqat_tf.calibrate_ranges(model, batches, num_batches=2)
    fused = export_lib.export(model, batches, max_batches=None)
    original = fused_clip.fuse_lower_clips
    try:
        fused_clip.fuse_lower_clips = lambda tree: 0
        kept = export_lib.export(model, batches, max_batches=None).tflite
    finally:
        fused_clip.fuse_lower_clips = original
    return fused, kept, batches


def _ops(content):
    utils, _ = flatbuffer.modules()
    model = flatbuffer.read(content)
    return collections.Counter(utils.opcode_to_name(model, op.opcodeIndex)
                               for op in model.subgraphs[0].operators)


def _tensors(content, x):
    """`{name: (grid values, scale)}` of every int8 tensor after one run on LiteRT's built-in
    kernels, the grid values being the integers less the zero point."""
    it = Interpreter(model_content=content, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    out = {}
    for d in it.get_tensor_details():
        scales, zero_points = d["quantization_parameters"]["scales"], \
            d["quantization_parameters"]["zero_points"]
        if d["dtype"] == np.int8 and len(scales) == 1:
            values = it.get_tensor(d["index"]).astype(np.int32) - int(zero_points[0])
            out[d["name"]] = (values, float(scales[0]))
    return out


def test_the_lower_clips_become_fused_activations(files):
    fused, kept, _ = files
    # `stem`'s requantization onto `mix`'s grid and `mix`'s output; the image's clip has no
    # op before it to take it.
    assert fused.fused_clips == 2
    before, after = _ops(kept), _ops(fused.tflite)
    assert before["MUL"] - after["MUL"] == 2 and after["MUL"] >= 2
    assert {k: v for k, v in before.items() if k != "MUL"} == \
        {k: v for k, v in after.items() if k != "MUL"}
    utils, schema = flatbuffer.modules()
    model = flatbuffer.read(fused.tflite)
    graph = model.subgraphs[0]
    fused_ops = [op for op in graph.operators if getattr(
        op.builtinOptions, "fusedActivationFunction", None)
        == schema.ActivationFunctionType.RELU_N1_TO_1]
    assert sorted(utils.opcode_to_name(model, op.opcodeIndex) for op in fused_ops) == \
        ["CONV_2D", "MUL"]
    for op in fused_ops:   # the claimed scale is 1 / 2^(b-1): -1 is the 4-bit minimum, -8
        assert graph.tensors[op.outputs[0]].quantization.scale.tolist() == [0.125]


def test_every_tensor_keeps_its_integers_and_the_clip_still_clips(files):
    fused, kept, batches = files
    runner = TFLiteModel(kept)
    x = runner.quantize_input(3.0 * batches[0][:1])    # wide inputs: values below the grid
    a, b = _tensors(kept, x), _tensors(fused.tflite, x)
    clipped = 0
    for name, (values, scale) in b.items():
        if scale == 0.125:
            # The fused tensor holds the grid values the removed MUL wrote.
            source = next(k for k, (v, s) in a.items() if k not in b and v.shape == values.shape
                          and np.array_equal(v, values))
            assert a[source][1] != scale
            assert values.min() == -8        # the clip was needed and took effect
            clipped += 1
        else:
            np.testing.assert_array_equal(values, a[name][0], err_msg=name)
    assert clipped == 2


def test_xnnpack_gives_the_same_outputs(files):
    fused, kept, batches = files
    a, b = TFLiteModel(kept), TFLiteModel(fused.tflite)
    for images in batches:
        for scale in (1.0, 3.0):
            np.testing.assert_array_equal(a(scale * images), b(scale * images))


def test_matching_scale_is_exact_or_none():
    rng = np.random.default_rng(0)
    found = missing = 0
    for a, product in rng.uniform(1e-4, 1e-2, size=(2000, 2)).astype(np.float32):
        x = fused_clip._matching_scale(a, product)
        if x is not None:
            assert np.float32(a * x) == product
            found += 1
            continue
        # None only where no float32 near product / a gives it.
        guess = np.float32(np.float64(product) / np.float64(a))
        window = guess + np.arange(-64, 65) * np.spacing(guess)
        assert not np.any((np.float32(a) * window.astype(np.float32)) == product)
        missing += 1
    assert found > 1000 and missing > 0     # both cases occur


def _clips(content):
    """`(object tree, its ops, the indices of its lower-clip MULs)` of `content`."""
    model = flatbuffer.read(content)
    ops = fused_clip._Ops(model, model.subgraphs[0])
    return model, ops, [i for i in range(len(ops.names)) if fused_clip._lower_clip(ops, i)]


def _claimable(a, k, s):
    """Whether a kernel scale `k` of a conv reading scale `a` and writing step `s` has a
    float32 replacement giving its multiplier exactly when the output claims 1/8."""
    target = np.float32(np.float32(a * k) / s) * np.float32(0.125)
    return fused_clip._matching_scale(a, target) is not None


def test_a_clip_stays_where_the_scale_cannot_be_claimed_exactly(files):
    _, kept, _ = files
    model, ops, clips = _clips(kept)
    graph = model.subgraphs[0]
    producers = {ops.names[ops.producer[x]]: (i, x) for i, (x, _, _) in
                 ((i, fused_clip._lower_clip(ops, i)) for i in clips) if x in ops.producer}
    # A clip whose output is also a model output stays (here: `stem`'s requantization, so
    # `mix` keeps reading `stem`'s step).
    graph.outputs = np.append(graph.outputs,
                              ops.op(producers["MUL"][0]).outputs[0]).astype(np.int32)
    # `mix`'s clip is fused when every kernel scale of `mix` can be replaced exactly, and
    # stays when one cannot.
    x = producers["CONV_2D"][1]
    conv = ops.op(ops.producer[x])
    a = np.float32(graph.tensors[conv.inputs[0]].quantization.scale[0])
    s = np.float32(graph.tensors[x].quantization.scale[0])
    scales = np.asarray(graph.tensors[conv.inputs[1]].quantization.scale, np.float32).copy()
    # 5-15% of float32 scales have no exact replacement; a step of 0.1% gives another draw.
    for c in range(len(scales)):
        while not _claimable(a, scales[c], s):
            scales[c] *= np.float32(1.001)
    graph.tensors[conv.inputs[1]].quantization.scale = scales
    assert fused_clip.fuse_lower_clips(flatbuffer.read(flatbuffer.write(model))) == 1
    scales = scales.copy()
    while _claimable(a, scales[0], s):
        scales[0] *= np.float32(1.001)
    graph.tensors[conv.inputs[1]].quantization.scale = scales
    assert fused_clip.fuse_lower_clips(model) == 0
    assert _ops(flatbuffer.write(model))["MUL"] == ops.names.count("MUL")
