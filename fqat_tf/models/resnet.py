"""ResNet-50 and ResNet-18 as Keras 3 functional models, laid out like torchvision's.

The layout follows torchvision (ResNet "v1.5"), because the MoCo-v2 checkpoints the paper starts
from were trained with it:

* the stride of a bottleneck sits on its 3x3 conv, not on the first 1x1 conv (Caffe/Keras
  applications put it on the 1x1);
* convs carry no bias (the BatchNorm after each one has its own offset);
* a downsampling shortcut is a 1x1 conv followed by BatchNorm;
* padding is explicit wherever torch pads symmetrically and Keras's ``"same"`` would not: the
  7x7/2 stem, the 3x3/2 max pool and every 3x3 conv of stride 2. Keras's ``"same"`` pads
  stride-2 convs of even inputs only at the bottom/right, torch pads both sides, and the two
  grids would then be offset by one pixel.

Layer names mirror torchvision's module names with ``_`` for ``.`` (``layer2_0_conv2`` is
``layer2.0.conv2``; ``layer2_0_downsample_conv``/``_bn`` are ``downsample.0``/``.1``), so
:func:`torch_module_name` maps one onto the other. The first conv is ``conv1`` and the last layer
is the ``Dense`` named ``classifier`` that returns logits; activations are separate ``ReLU``
layers, so a quantizer can sit on every conv input.

BatchNorm uses torch's epsilon (1e-5) and momentum (0.1 in torch, 0.9 in Keras). The trainer
freezes it (``defaults.FREEZE_BN``) by calling the model with ``training=False``, which makes
every BatchNorm normalise with its moving statistics and leaves them unchanged. (In training
mode Keras updates the moving variance with the biased batch variance, torch with the unbiased
one; frozen BatchNorm never updates it.)
"""
import keras

from fqat_tf import defaults

_RESNET50_BLOCKS = (3, 4, 6, 3)
_RESNET18_BLOCKS = (2, 2, 2, 2)
_BOTTLENECK_EXPANSION = 4


def _conv(x, filters, kernel_size, stride, name):
    """A bias-free conv with torch's symmetric padding of ``kernel_size // 2``."""
    pad = kernel_size // 2
    if pad and stride > 1:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        # At stride 1 "same" pads an odd kernel by k//2 on every side, exactly as torch.
        padding = "same" if pad else "valid"
    return keras.layers.Conv2D(
        filters, kernel_size, strides=stride, padding=padding, use_bias=False,
        # torchvision initialises convs with kaiming_normal_(mode="fan_out", relu gain).
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"),
        name=name)(x)


def _bn(x, name):
    return keras.layers.BatchNormalization(
        momentum=defaults.BN_MOMENTUM, epsilon=defaults.BN_EPSILON, name=name)(x)


def _shortcut(x, filters, stride, name):
    if stride == 1 and x.shape[-1] == filters:
        return x
    x = _conv(x, filters, 1, stride, f"{name}_downsample_conv")
    return _bn(x, f"{name}_downsample_bn")


def _bottleneck(x, planes, stride, name):
    shortcut = _shortcut(x, planes * _BOTTLENECK_EXPANSION, stride, name)
    y = _conv(x, planes, 1, 1, f"{name}_conv1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(_bn(y, f"{name}_bn1"))
    y = _conv(y, planes, 3, stride, f"{name}_conv2")
    y = keras.layers.ReLU(name=f"{name}_relu2")(_bn(y, f"{name}_bn2"))
    y = _conv(y, planes * _BOTTLENECK_EXPANSION, 1, 1, f"{name}_conv3")
    y = _bn(y, f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu3")(y)


def _basic_block(x, planes, stride, name):
    shortcut = _shortcut(x, planes, stride, name)
    y = _conv(x, planes, 3, stride, f"{name}_conv1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(_bn(y, f"{name}_bn1"))
    y = _conv(y, planes, 3, 1, f"{name}_conv2")
    y = _bn(y, f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)


def classifier(x, num_classes):
    """The logits head shared by every backbone: a ``Dense`` named ``classifier``.

    Initialised like torch's ``nn.Linear``: kernel and bias uniform in +-1/sqrt(fan_in).

    Args:
        x: Pooled features, shape ``(batch, features)``.
        num_classes: Number of output logits.

    Returns:
        The logits tensor.
    """
    limit = float(x.shape[-1]) ** -0.5
    return keras.layers.Dense(
        num_classes, name="classifier",
        kernel_initializer=keras.initializers.VarianceScaling(
            1.0 / 3.0, mode="fan_in", distribution="uniform"),
        bias_initializer=keras.initializers.RandomUniform(-limit, limit))(x)


def _check_args(num_classes, input_shape, width, name):
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"{name}: num_classes must be a positive int or None, got {num_classes!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{name}: width must be a positive int, got {width!r}")
    if len(input_shape) != 3:
        raise ValueError(f"{name}: input_shape must be (height, width, channels), got {input_shape!r}")


def _resnet(block, blocks, expansion, num_classes, input_shape, width, name):
    _check_args(num_classes, input_shape, width, name)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv(inputs, width, 7, 2, "conv1")
    x = keras.layers.ReLU(name="relu")(_bn(x, "bn1"))
    # Zero padding gives the same max as torch's -inf padding: the input is a ReLU output (>= 0)
    # and every 3x3 window holds at least one real pixel.
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    for stage, num_blocks in enumerate(blocks):
        planes = width * 2 ** stage
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            x = block(x, planes, stride, f"layer{stage + 1}_{index}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    if num_classes is not None:
        x = classifier(x, num_classes)
    return keras.Model(inputs, x, name=name)


def resnet50(num_classes, input_shape=(224, 224, 3), width=64, name="resnet50"):
    """ResNet-50 in torchvision's layout (bottleneck blocks 3-4-6-3, stride on the 3x3 conv).

    Args:
        num_classes: Number of logits of the ``classifier`` head; ``None`` builds the headless
            feature extractor (output: the ``8 * 4 * width`` pooled features), the form in which
            converted MoCo-v2 weights are stored.
        input_shape: ``(height, width, channels)``; spatial sizes may be ``None``.
        width: Channels of the stem and of the first stage's 3x3 convs (torchvision: 64). A small
            width such as 8 or 16 keeps tests and the quickstart fast on CPU.
        name: Model name.

    Returns:
        A functional ``keras.Model`` mapping normalised images to logits.
    """
    return _resnet(_bottleneck, _RESNET50_BLOCKS, _BOTTLENECK_EXPANSION, num_classes,
                   input_shape, width, name)


def resnet18(num_classes, input_shape=(224, 224, 3), width=64, name="resnet18"):
    """ResNet-18 in torchvision's layout (basic blocks 2-2-2-2).

    Args:
        num_classes: Number of logits of the ``classifier`` head; ``None`` for the headless
            feature extractor (``8 * width`` pooled features).
        input_shape: ``(height, width, channels)``; spatial sizes may be ``None``.
        width: Channels of the stem and the first stage (torchvision: 64).
        name: Model name.

    Returns:
        A functional ``keras.Model`` mapping normalised images to logits.
    """
    return _resnet(_basic_block, _RESNET18_BLOCKS, 1, num_classes, input_shape, width, name)


def torch_module_name(layer_name):
    """torchvision's module name for one of this file's conv or BatchNorm layer names.

    Args:
        layer_name: A Keras layer name such as ``"layer3_1_bn2"`` or ``"layer2_0_downsample_conv"``.

    Returns:
        The torchvision module path, e.g. ``"layer3.1.bn2"`` or ``"layer2.0.downsample.0"``.
    """
    name = layer_name.replace("_downsample_conv", "_downsample_0")
    name = name.replace("_downsample_bn", "_downsample_1")
    return name.replace("_", ".")


def is_resnet50(model):
    """True when ``model`` has the conv layout of :func:`resnet50` (of any width)."""
    names = {layer.name for layer in model.layers}
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # 1 stem + 16 blocks x 3 convs + 4 downsample convs.
    return len(convs) == 53 and {"conv1", "layer3_5_conv3", "layer4_2_conv3"} <= names
