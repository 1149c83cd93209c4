"""Reading and writing a TFLite flatbuffer: the converter's schema, which Keras layer a kernel
tensor belongs to, and a writer that stores each distinct quantization vector once.

Per-channel quantization gives every kernel and every bias a scale vector (float32) and a
zero-point vector (int64) as long as its output channels. The zero points of a symmetric
int8 or int4 kernel and of an int32 bias are all 0, so a layer holds 16 bytes a channel of
zeros, repeated in every layer of the same width: 3% of the float model's size in a MobileNet,
a sixth of its int4 file. A flatbuffer table may point at a vector another table points at
(the format is a graph of offsets; the runtime only reads through them), so `write` stores
each distinct vector once and each distinct quantization table once. The runtime sees the same
values.
"""
import importlib

import flatbuffers
import numpy as np

from export.emitter import KERNEL_PREFIX

_TFLITE_FILE_IDENTIFIER = b"TFL3"
# QuantizationParameters vectors and their element types in the schema.
_QUANTIZATION_VECTORS = (("min", np.float32), ("max", np.float32), ("scale", np.float32),
                         ("zeroPoint", np.int64))


def modules():
    """`(flatbuffer_utils, schema)`: TensorFlow's flatbuffer tools, imported by name (`tf.lite`
    has no public `tools`)."""
    utils = importlib.import_module("tensorflow.lite.tools.flatbuffer_utils")
    schema = importlib.import_module("tensorflow.lite.python.schema_py_generated")
    return utils, schema


def read(content):
    """The mutable object tree of a flatbuffer's bytes."""
    utils, _ = modules()
    return utils.read_model_from_bytearray(bytearray(content))


class _SharedQuantization:
    """Packs one tensor's `QuantizationParametersT` with the vectors and tables already in
    `shared` (keyed by content), adding the ones that are new. `TensorT.Pack` calls `Pack`."""

    def __init__(self, params, shared, schema):
        self.params, self.shared, self.schema = params, shared, schema

    def _vector(self, builder, dtype, values):
        values = np.asarray(values, dtype)
        key = ("vector", values.dtype.str, values.tobytes())
        if key not in self.shared:
            self.shared[key] = builder.CreateNumpyVector(values)
        return self.shared[key]

    def Pack(self, builder):  # noqa: N802 (the flatbuffer object API's name)
        q, s = self.params, self.schema
        if q.details is not None:
            return q.Pack(builder)
        vectors = {name: self._vector(builder, dtype, getattr(q, name))
                   for name, dtype in _QUANTIZATION_VECTORS if getattr(q, name) is not None}
        key = ("table", tuple(sorted(vectors.items())), q.detailsType, q.quantizedDimension)
        if key not in self.shared:
            s.QuantizationParametersStart(builder)
            for name, _ in _QUANTIZATION_VECTORS:
                if name in vectors:
                    getattr(s, f"QuantizationParametersAdd{name[0].upper()}{name[1:]}")(
                        builder, vectors[name])
            s.QuantizationParametersAddDetailsType(builder, q.detailsType)
            s.QuantizationParametersAddQuantizedDimension(builder, q.quantizedDimension)
            self.shared[key] = s.QuantizationParametersEnd(builder)
        return self.shared[key]


def write(model):
    """The flatbuffer bytes of the object tree `model`, each distinct quantization vector and
    table stored once (module docstring); `model` is left as it was."""
    _, schema = modules()
    tensors = [t for graph in model.subgraphs for t in graph.tensors
               if t.quantization is not None]
    originals = [t.quantization for t in tensors]
    shared = {}
    try:
        for tensor in tensors:
            tensor.quantization = _SharedQuantization(tensor.quantization, shared, schema)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=_TFLITE_FILE_IDENTIFIER)
        return bytes(builder.Output())
    finally:
        for tensor, params in zip(tensors, originals):
            tensor.quantization = params


def compact(content):
    """`content` rewritten by `write`: the same model, each distinct quantization vector once."""
    return write(read(content))


def tensor_name(tensor):
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def layer_of(tensor):
    """The Keras layer whose kernel a weight tensor holds (`Emitter.kernel` names it), or None
    for other tensors."""
    for part in tensor_name(tensor).split(";"):
        if part.startswith(KERNEL_PREFIX):
            return part[len(KERNEL_PREFIX):]
    return None
