"""What each Keras layer type is in an integer model: weighted, passthrough, an activation, a
per-channel affine, a storage layer, or why it cannot be kept integer."""
import keras

from fqat_tf import activations, int8_activations, int8_storage, layer_types
from fqat_tf.wrapper import QuantizeWrapper

# TFLite gives a concatenation's inputs the output's scale: quantizing the output quantizes
# each input the same way.
SAME_SCALE_TYPES = layer_types.PASSTHROUGH_TYPES + (keras.layers.Concatenate,)
POOLING_TYPES = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                 keras.layers.GlobalAveragePooling2D)


def inner_layer(layer):
    """The float layer inside a `QuantizeWrapper`, or the layer itself."""
    return layer.layer if isinstance(layer, QuantizeWrapper) else layer


def activation_name(layer):
    """"linear", "relu" or another name for the activation a layer applies to its output."""
    return activations.function_name(getattr(inner_layer(layer), "activation", None))


def is_weighted(layer):
    """A Conv2D, DepthwiseConv2D or Dense, wrapped or not."""
    return layer_types.is_weighted(inner_layer(layer))


def is_conv(layer):
    """A Conv2D or DepthwiseConv2D, wrapped or not."""
    return layer_types.is_conv(inner_layer(layer))


def is_affine(layer):
    """A per-channel affine layer the integer model runs as a depthwise multiply-add."""
    return isinstance(layer, layer_types.AFFINE_TYPES + (int8_activations.Int8Affine,))


def activation_of(layer):
    """The `fqat_tf.activations.Activation` an activation layer computes (an `Int8Activation`
    included), or None for other layers."""
    if isinstance(layer, int8_activations.Int8Activation):
        return layer.kind
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
        return activations.get(activations.of_layer(layer))
    return None


def output_bounds(layer):
    """`(lo, hi)` of the output of an activation layer, or of a conv or dense with a fused
    ReLU or ReLU6 (`(-inf, inf)` for a linear one); None for other layers."""
    if isinstance(layer, int8_activations.Int8Activation):
        return layer.kind.bounds
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
        return activations.bounds(layer)
    if is_weighted(layer):
        act = activations.get(activation_name(layer))
        return None if act is None else act.bounds
    return None


def is_fused_activation(layer):
    """A ReLU or ReLU6 layer that TFLite fuses into the conv, add or affine before it."""
    act = activation_of(layer)
    return act is not None and act.fused and act.name != "linear"


def stores_input(layer):
    """The integer model keeps the layer's input on an 8-bit range of the layer's own.

    So do int8 storage layers (`RangeQuantize`, `Int8Activation`, `Int8Affine`), and so does
    every layer int8 storage turns into one of them: an activation TFLite does not fuse (its
    kernel reads one int8 tensor) and a per-channel affine layer. (A BatchNormalization folded
    into its conv is the plan's business, not this.)
    """
    if isinstance(layer, (int8_storage.RangeQuantize, int8_activations.Int8Activation)):
        return True
    act = activation_of(layer)
    return is_affine(layer) or (act is not None and not act.fused)


def fixed_output_range(layer):
    """The int8 range TFLite's kernel fixes for `layer`'s output, or None."""
    act = activation_of(layer)
    return None if act is None else act.output_range


def owns_output_range(layer):
    """The layer keeps an 8-bit range of its output (int8 storage of a HARD_SWISH)."""
    return isinstance(layer, int8_activations.Int8Activation) and layer.kind.own_output


def _channels_last(layer, input_shapes):
    axis = getattr(layer, "axis", -1)
    axes = [axis] if isinstance(axis, int) else list(axis)
    rank = len(input_shapes[0])
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def unsupported_reason(layer, input_shapes):
    """Why `layer` (reading tensors of `input_shapes`) cannot be exported integer, or None.

    A BatchNormalization that follows a linear conv is folded into it and never asked about.
    """
    if isinstance(layer, int8_activations.Int8Affine):
        layer = layer.layer
    inner = inner_layer(layer)
    if layer_types.is_weighted(inner):
        act = activations.get(activation_name(layer))
        if act is None or not act.fused:
            return (f"activation {activation_name(layer)!r} fused into the layer "
                    f"(fqat_tf.quantize_model moves it into a layer of its own)")
        if getattr(inner, "groups", 1) != 1:
            return "grouped convolution"
        if getattr(inner, "data_format", "channels_last") != "channels_last":
            return "channels_first"
        if isinstance(inner, keras.layers.Dense) and len(input_shapes[0]) != 2:
            return "Dense on a tensor of rank > 2"
        return None
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold or 0.0) != 0.0:
            return "leaky or thresholded ReLU"
        return None
    if isinstance(layer, (keras.layers.Activation, int8_activations.Int8Activation)):
        if activation_of(layer) is None:
            return f"activation {activations.of_layer(layer)!r} has no int8 kernel here"
        return None
    if isinstance(layer, (keras.layers.Add, keras.layers.Multiply)):
        if len(input_shapes) != 2:
            return f"{type(layer).__name__} of more than two tensors"
        return None
    if isinstance(layer, keras.layers.GroupNormalization):
        axis = layer.axis if layer.axis == -1 else layer.axis - len(input_shapes[0])
        if axis != -1 or len(input_shapes[0]) != 4 or None in input_shapes[0][1:]:
            return "GroupNormalization over a non-channel axis or an unknown spatial size"
        return None
    if isinstance(layer, layer_types.AFFINE_TYPES):
        if not _channels_last(layer, input_shapes):
            return f"{type(layer).__name__} over another axis than the last"
        if getattr(layer, "invert", False):
            return "inverted Normalization"
        return None
    if isinstance(layer, POOLING_TYPES):
        fmt = getattr(layer, "data_format", "channels_last")
        return None if fmt == "channels_last" else "channels_first"
    if isinstance(layer, SAME_SCALE_TYPES + (int8_storage.RangeQuantize,)):
        return None
    if not isinstance(layer, keras.layers.Layer):
        return f"no integer lowering for the operation {type(layer).__name__}"
    return f"no integer lowering for {type(layer).__name__}"
