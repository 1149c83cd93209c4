"""What XNNPACK, LiteRT's default CPU runtime, cannot run in a full-integer model.

XNNPACK requantizes a convolution's or fully-connected layer's int32 accumulator with one
float multiplier per channel, `input scale * kernel scale / output scale`, and accepts it only
in `[2^-32, 256)`. The delegate does not check this before it takes the op: a model outside the
range fails when the interpreter allocates its tensors ("failed to create XNNPACK runtime", or
an abort). A multiplier of 256 or more means an output range narrower than one accumulator
step: a tensor that is (nearly) constant on the data its range came from.
"""
import numpy as np

from export import flatbuffer

LINEAR_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
MULTIPLIER_RANGE = (2.0 ** -32, 256.0)


def _scales(graph, index):
    q = graph.tensors[index].quantization
    return None if q is None or q.scale is None else np.asarray(q.scale, np.float64)


def requantization_problems(content):
    """The linear ops of `content` whose requantization multiplier XNNPACK cannot run.

    Returns:
      A list of `{"layer", "op", "multiplier": (min, max), "output_range": (lo, hi)}`, one per
      op with a multiplier outside `MULTIPLIER_RANGE`; `layer` names the Keras layer.
    """
    utils, schema = flatbuffer.modules()
    model = flatbuffer.read(content)
    problems = []
    for graph in model.subgraphs:
        for op in graph.operators:
            name = utils.opcode_to_name(model, op.opcodeIndex)
            out = graph.tensors[op.outputs[0]]
            if name not in LINEAR_OPS or out.type != schema.TensorType.INT8:
                continue
            scales = [_scales(graph, op.inputs[i]) for i in (0, 1)] + [_scales(graph, op.outputs[0])]
            if any(s is None for s in scales):
                continue
            multiplier = scales[0][0] * scales[1] / scales[2][0]
            lo, hi = MULTIPLIER_RANGE
            if multiplier.min() >= lo and multiplier.max() < hi:
                continue
            zero = int(np.asarray(out.quantization.zeroPoint)[0])
            problems.append({
                "layer": flatbuffer.layer_of(graph.tensors[op.inputs[1]]), "op": name,
                "multiplier": (float(multiplier.min()), float(multiplier.max())),
                "output_range": (float((-128 - zero) * scales[2][0]),
                                 float((127 - zero) * scales[2][0]))})
    return problems
