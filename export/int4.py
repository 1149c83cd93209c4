"""4-bit weights stored in 4 bits, where LiteRT's CPU runtime runs them so: an int8 TFLite
model whose learned 4-bit kernels are rewritten as INT4 tensors (two weights a byte).

The exporter stores a learned b-bit kernel as its b-bit integers in int8 with per-channel
scales (`export.fold`), so a 4-bit (or narrower) kernel's integers already lie in [-8, 7] and
the flatbuffer can hold them twice as densely with the same scales. XNNPACK, LiteRT's default
CPU runtime, takes INT4 weights in FULLY_CONNECTED only. A 1x1 stride-1 CONV_2D is a
FULLY_CONNECTED over the channel axis (`keep_num_dims`), the pointwise convs that hold most of
a MobileNet's or EfficientNet's weights, so it is rewritten as one: XNNPACK computes the same
integers as from the int8 file. Every other kernel stays int8, with the reason: LiteRT runs
CONV_2D and DEPTHWISE_CONV_2D with INT4 weights only on its built-in kernels, outside
XNNPACK's partition, slower, and requantizing in two fixed-point roundings where XNNPACK (and
the trained model) round once, which moved 5-30% of the top-1 predictions of 3-4 bit
MobileNetV2 and EfficientNetB0 models (BUILD_NOTES.md). A kernel with wider integers (the
first conv and the classifier, trained on their int8 grids) stays int8 too.
"""
import dataclasses

import numpy as np

from export import flatbuffer

INT4_MIN, INT4_MAX = -8, 7
# FULLY_CONNECTED with keep_num_dims (what TFLite's op versioning gives it).
FULLY_CONNECTED_VERSION = 5


@dataclasses.dataclass
class Int4Result:
    """The rewritten flatbuffer and where its kernels are stored in 4 bits.

    Attributes:
      tflite: the flatbuffer.
      int4: `{layer: kernel element count}` of the kernels stored as INT4.
      int8: `{layer: why its kernel stays int8}`.
      as_fully_connected: the 1x1 convolutions rewritten as FULLY_CONNECTED.
    """

    tflite: bytes
    int4: dict
    int8: dict
    as_fully_connected: list


def pack(values):
    """int8 values in [-8, 7] as packed INT4 bytes: two a byte, the first in the low nibble
    (TFLite's layout); an odd count leaves the last high nibble 0."""
    nibbles = (np.asarray(values, np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _is_pointwise(op, kernel):
    """A CONV_2D whose kernel is 1x1 and whose strides are 1 (padding and dilation then do
    nothing)."""
    options = op.builtinOptions
    return (list(kernel.shape[1:3]) == [1, 1] and options.strideH == 1
            and options.strideW == 1)


def _fully_connected_opcode(model, schema):
    """The index of a FULLY_CONNECTED operator code at `FULLY_CONNECTED_VERSION`, added if the
    model has none."""
    code = schema.BuiltinOperator.FULLY_CONNECTED
    for index, opcode in enumerate(model.operatorCodes):
        if (max(opcode.builtinCode, opcode.deprecatedBuiltinCode) == code
                and opcode.version == FULLY_CONNECTED_VERSION):
            return index
    opcode = schema.OperatorCodeT()
    opcode.builtinCode = opcode.deprecatedBuiltinCode = code
    opcode.version = FULLY_CONNECTED_VERSION
    model.operatorCodes.append(opcode)
    return len(model.operatorCodes) - 1


def _to_fully_connected(model, schema, op, kernel):
    """Rewrites a pointwise CONV_2D as FULLY_CONNECTED over the last axis, in place."""
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = op.builtinOptions.fusedActivationFunction
    options.keepNumDims = True
    op.opcodeIndex = _fully_connected_opcode(model, schema)
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = options
    # [out, 1, 1, in] -> [out, in]; the per-channel scales stay on axis 0.
    kernel.shape = np.array([kernel.shape[0], kernel.shape[3]], np.int32)
    kernel.shapeSignature = None


def pack_int4_weights(content):
    """Rewrites every layer kernel of `content` that fits in 4 bits and that XNNPACK runs with
    INT4 weights (FULLY_CONNECTED, and pointwise CONV_2D rewritten as one) as INT4.

    Args:
      content: an int8 TFLite flatbuffer (`export.tflite.export`).

    Returns:
      An `Int4Result`.
    """
    utils, schema = flatbuffer.modules()
    model = flatbuffer.read(content)
    int4, int8, as_fully_connected = {}, {}, []
    for graph in model.subgraphs:
        for op in graph.operators:
            if len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            kernel = graph.tensors[op.inputs[1]]
            layer = flatbuffer.layer_of(kernel)
            if layer is None or kernel.type != schema.TensorType.INT8:
                continue
            op_name = utils.opcode_to_name(model, op.opcodeIndex)
            values = np.frombuffer(bytes(bytearray(model.buffers[kernel.buffer].data)), np.int8)
            pointwise = op_name == "CONV_2D" and _is_pointwise(op, kernel)
            if values.min() < INT4_MIN or values.max() > INT4_MAX:
                int8[layer] = f"integers in [{values.min()}, {values.max()}] need 8 bits"
                continue
            if op_name != "FULLY_CONNECTED" and not pointwise:
                int8[layer] = (f"{op_name} {'x'.join(map(str, kernel.shape[1:3]))}: XNNPACK "
                               f"takes INT4 weights only in FULLY_CONNECTED (and 1x1 stride-1 "
                               f"convs, rewritten as one)")
                continue
            if pointwise:
                _to_fully_connected(model, schema, op, kernel)
                as_fully_connected.append(layer)
            model.buffers[kernel.buffer].data = pack(values)
            kernel.type = schema.TensorType.INT4
            int4[layer] = int(values.size)
    return Int4Result(flatbuffer.write(model), int4, int8, as_fully_connected)
