"""What each Keras layer type is in an integer model: weighted, passthrough, fusable, or why
it cannot be kept integer."""
import keras

from fqat_tf import int8_storage
from fqat_tf.quantize import QuantizeWrapper

# Layers through which a quantizer can be moved to the input without changing any value:
# quantization is monotone and maps 0 to 0, so it commutes with padding, max pooling and
# reshapes. TFLite runs them with one scale on input and output.
PASSTHROUGH_TYPES = (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D, keras.layers.Flatten,
                     keras.layers.Reshape, keras.layers.Dropout, keras.layers.Identity)
CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
WEIGHTED_TYPES = CONV_TYPES + (keras.layers.Dense,)


def inner_layer(layer):
    """The float layer inside a `QuantizeWrapper`, or the layer itself."""
    return layer.layer if isinstance(layer, QuantizeWrapper) else layer


def activation_name(layer):
    """"linear", "relu" or another name for the activation a layer applies to its output."""
    act = getattr(inner_layer(layer), "activation", None)
    return "linear" if act is None else getattr(act, "__name__", str(act))


def is_weighted(layer):
    """A Conv2D, DepthwiseConv2D or Dense, wrapped or not."""
    return type(inner_layer(layer)) in WEIGHTED_TYPES


def is_conv(layer):
    """A Conv2D or DepthwiseConv2D, wrapped or not."""
    return type(inner_layer(layer)) in CONV_TYPES


def is_plain_relu(layer):
    """A ReLU layer (or relu Activation) that TFLite can fuse into the op before it."""
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None and float(layer.negative_slope) == 0.0
                and float(layer.threshold) == 0.0)
    return isinstance(layer, keras.layers.Activation) and activation_name(layer) == "relu"


def unsupported_reason(layer, input_shapes):
    """Why `layer` (reading tensors of `input_shapes`) cannot be exported integer, or None."""
    inner = inner_layer(layer)
    if type(inner) in WEIGHTED_TYPES:
        if activation_name(layer) not in ("linear", "relu"):
            return f"activation {activation_name(layer)!r} has no int8 kernel here"
        if getattr(inner, "groups", 1) != 1:
            return "grouped convolution"
        if getattr(inner, "data_format", "channels_last") != "channels_last":
            return "channels_first"
        if isinstance(inner, keras.layers.Dense) and len(input_shapes[0]) != 2:
            return "Dense on a tensor of rank > 2"
        return None
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return "leaky or thresholded ReLU"
        return None
    if isinstance(layer, keras.layers.Activation):
        ok = activation_name(layer) in ("linear", "relu")
        return None if ok else f"activation {activation_name(layer)!r} has no int8 kernel here"
    if isinstance(layer, keras.layers.Add):
        return None if len(input_shapes) == 2 else "Add of more than two tensors"
    if isinstance(layer, keras.layers.GroupNormalization):
        axis = layer.axis if layer.axis == -1 else layer.axis - len(input_shapes[0])
        if axis != -1 or len(input_shapes[0]) != 4 or None in input_shapes[0][1:]:
            return "GroupNormalization over a non-channel axis or an unknown spatial size"
        return None
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                          keras.layers.GlobalAveragePooling2D)):
        fmt = getattr(layer, "data_format", "channels_last")
        return None if fmt == "channels_last" else "channels_first"
    if isinstance(layer, PASSTHROUGH_TYPES + (keras.layers.Concatenate,
                                              int8_storage.RangeQuantize)):
        return None
    if isinstance(layer, keras.layers.BatchNormalization):
        return "BatchNormalization that does not directly follow a linear Conv2D/DepthwiseConv2D"
    return f"no integer lowering for {type(layer).__name__}"
