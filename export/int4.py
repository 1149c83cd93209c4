"""4-bit weights stored in 4 bits: an int8 TFLite model whose learned 4-bit kernels are
rewritten as INT4 tensors (two weights a byte).

The exporter stores a learned b-bit kernel as its b-bit integers in int8 with per-channel
scales (`export.fold`), so a 4-bit (or narrower) kernel's integers already lie in [-8, 7]; the
flatbuffer keeps them twice as densely with the same scales, and LiteRT's built-in kernels
compute exactly what they compute with the int8 tensor. LiteRT 2.3 runs CONV_2D,
DEPTHWISE_CONV_2D and FULLY_CONNECTED with INT4 weights and int8 activations (`INT4_OPS`);
its XNNPACK delegate takes FULLY_CONNECTED only (`XNNPACK_INT4_OPS`): int4 convolutions run on
the built-in kernels, which requantize in fixed point rather than XNNPACK's float, and outside
the delegate's partition. A kernel that holds wider integers (the first conv and the
classifier, trained on their int8 grids) stays int8.
"""
import dataclasses

import numpy as np

from export import flatbuffer

INT4_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
XNNPACK_INT4_OPS = ("FULLY_CONNECTED",)
INT4_MIN, INT4_MAX = -8, 7


@dataclasses.dataclass
class Int4Result:
    """The rewritten flatbuffer and where its kernels are stored in 4 bits.

    Attributes:
      tflite: the flatbuffer.
      int4: `{layer: kernel element count}` of the kernels stored as INT4.
      int8: `{layer: why its kernel stays int8}`.
      builtin: layers whose INT4 op XNNPACK leaves to LiteRT's built-in kernels.
    """

    tflite: bytes
    int4: dict
    int8: dict
    builtin: list


def pack(values):
    """int8 values in [-8, 7] as packed INT4 bytes: two a byte, the first in the low nibble
    (TFLite's layout); an odd count leaves the last high nibble 0."""
    nibbles = (np.asarray(values, np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def pack_int4_weights(content):
    """Rewrites every layer kernel of `content` whose integers fit in 4 bits as INT4.

    Args:
      content: an int8 TFLite flatbuffer (`export.tflite.export`).

    Returns:
      An `Int4Result`.
    """
    utils, schema = flatbuffer.modules()
    model = flatbuffer.read(content)
    int4, int8, builtin = {}, {}, []
    for graph in model.subgraphs:
        for op in graph.operators:
            if len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            tensor = graph.tensors[op.inputs[1]]
            layer = flatbuffer.layer_of(tensor)
            if layer is None or tensor.type != schema.TensorType.INT8:
                continue
            op_name = utils.opcode_to_name(model, op.opcodeIndex)
            values = np.frombuffer(bytes(bytearray(model.buffers[tensor.buffer].data)), np.int8)
            if op_name not in INT4_OPS:
                int8[layer] = f"{op_name} takes no INT4 weights"
            elif values.min() < INT4_MIN or values.max() > INT4_MAX:
                int8[layer] = f"integers in [{values.min()}, {values.max()}] need 8 bits"
            else:
                model.buffers[tensor.buffer].data = pack(values)
                tensor.type = schema.TensorType.INT4
                int4[layer] = int(values.size)
                if op_name not in XNNPACK_INT4_OPS:
                    builtin.append(layer)
    return Int4Result(bytes(utils.convert_object_to_bytearray(model)), int4, int8, builtin)
