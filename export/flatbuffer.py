"""Reading and rewriting a TFLite flatbuffer: the converter's schema, and which Keras layer a
kernel tensor belongs to."""
import importlib

from export.emitter import KERNEL_PREFIX


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


def tensor_name(tensor):
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def layer_of(tensor):
    """The Keras layer whose kernel a weight tensor holds (`Emitter.kernel` names it), or None
    for other tensors."""
    for part in tensor_name(tensor).split(";"):
        if part.startswith(KERNEL_PREFIX):
            return part[len(KERNEL_PREFIX):]
    return None
