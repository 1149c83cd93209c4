"""Which Keras layers and models are which kind, asked by quantization, storage and export.

One home for the layer-type sets and predicates: the weighted layers the quantizers wrap, the
layers a quantization grid passes through unchanged, the layers that keep a tensor's sign, and
the check that a model is a functional graph this package can rewrite.
"""
import keras

from fqat_tf import activations

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
WEIGHTED_TYPES = CONV_TYPES + (keras.layers.Dense,)
# Layers through which a quantizer can be moved to the input without changing any value:
# quantization is monotone and maps 0 to 0, so it commutes with padding, max pooling and
# reshapes. TFLite runs them with one scale on input and output.
PASSTHROUGH_TYPES = (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D, keras.layers.Flatten,
                     keras.layers.Reshape, keras.layers.Dropout, keras.layers.Identity)
# Layers whose output is non-negative wherever their (first) input is: the passthrough layers
# and every pooling, cropping or upsampling (averages and copies of non-negative values).
SIGN_PRESERVING_TYPES = PASSTHROUGH_TYPES + (
    keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D, keras.layers.Cropping2D, keras.layers.UpSampling2D)
# Merges whose output is non-negative wherever all their inputs are.
SIGN_PRESERVING_MERGE_TYPES = (keras.layers.Add, keras.layers.Concatenate, keras.layers.Maximum,
                               keras.layers.Average, keras.layers.Multiply)
# Per-channel affine layers (`fqat_tf.affine`): a depthwise multiply-add in an integer model.
AFFINE_TYPES = (keras.layers.BatchNormalization, keras.layers.Rescaling,
                keras.layers.Normalization)
# Layers between the logits and the model output that leave the logits' layer the classifier.
SHAPE_TYPES = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Dropout,
               keras.layers.Identity, keras.layers.Activation, keras.layers.ReLU)


def is_weighted(layer):
    """A Conv2D, DepthwiseConv2D or Dense (exactly those types: subclasses such as
    SeparableConv2D compute something else)."""
    return type(layer) in WEIGHTED_TYPES


def is_conv(layer):
    """A Conv2D or DepthwiseConv2D (exactly those types)."""
    return type(layer) in CONV_TYPES


def is_linear(layer):
    """The layer applies no activation to its output (None or "linear")."""
    return activations.function_name(getattr(layer, "activation", None)) == "linear"


def is_functional(model):
    """A functional model's own graph (a Sequential model is functional only once viewed as
    `functional_view`)."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def functional_view(model, what):
    """`model` itself if functional, else a functional model over the same layers.

    Args:
      model: a functional or Sequential model built on an `Input`.
      what: the use errors name (e.g. "an integer model").

    Raises:
      ValueError: `model` has no symbolic inputs (a subclassed model, or one never built on an
        `Input`).
    """
    if is_functional(model):
        return model
    if not getattr(model, "inputs", None):
        raise ValueError(f"{what} needs a functional or Sequential model built on an Input, "
                         f"got {type(model).__name__} {model.name!r}")
    return keras.Model(model.inputs, model.outputs, name=model.name)
