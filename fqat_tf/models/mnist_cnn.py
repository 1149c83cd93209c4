"""DomainBed's MNIST CNN (``domainbed/networks.py: MNIST_CNN``) as a Keras 3 functional model.

DomainBed uses it for ColoredMNIST and RotatedMNIST: four 3x3 convs with 64, 128 (stride 2), 128
and 128 channels, each followed by ReLU and then GroupNorm with 8 groups, a global average pool to
128 features, and a linear classifier. Unlike the ResNets its convs keep their bias (no BatchNorm
follows them) and the normalisation comes *after* the ReLU, as in DomainBed. GroupNorm has no
running statistics, so the model behaves the same with ``training=True`` and ``training=False``.

At ``width=64`` and 10 classes on 28x28x1 inputs the model has DomainBed's 371,850 parameters.
"""
import keras

from fqat_tf import defaults
from fqat_tf.models.resnet import classifier


def _torch_conv(x, filters, stride, name):
    """A biased 3x3 conv padded by 1 on every side, initialised like torch's ``nn.Conv2d``."""
    if stride > 1:
        # Keras's "same" would pad a stride-2 conv of an even input only at the bottom/right;
        # torch pads 1 on every side, which shifts the sampling grid by one pixel.
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    limit = float(9 * x.shape[-1]) ** -0.5
    return keras.layers.Conv2D(
        filters, 3, strides=stride, padding=padding, use_bias=True,
        kernel_initializer=keras.initializers.VarianceScaling(
            1.0 / 3.0, mode="fan_in", distribution="uniform"),
        bias_initializer=keras.initializers.RandomUniform(-limit, limit),
        name=name)(x)


def mnist_cnn(num_classes=10, input_shape=(28, 28, 1), width=64, name="mnist_cnn"):
    """DomainBed's MNIST_CNN followed by a ``classifier`` Dense head.

    Layer names follow DomainBed's module names: ``conv1``..``conv4`` and the GroupNorms
    ``bn0``..``bn3``; ReLUs are separate layers ``relu1``..``relu4``.

    Args:
        num_classes: Number of logits (RotatedMNIST: 10); ``None`` for the headless feature
            extractor (``2 * width`` pooled features).
        input_shape: ``(height, width, channels)``; DomainBed's RotatedMNIST is 28x28x1.
        width: Channels of the first conv; the other three have ``2 * width`` (DomainBed: 64).
            Must be a multiple of the GroupNorm group count (8).
        name: Model name.

    Returns:
        A functional ``keras.Model`` mapping images to logits.

    Raises:
        ValueError: On a non-positive ``num_classes``, a width that 8 groups cannot divide, or an
            input shape that is not ``(height, width, channels)``.
    """
    groups = defaults.GROUPNORM_GROUPS
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"{name}: num_classes must be a positive int or None, got {num_classes!r}")
    if not isinstance(width, int) or width < groups or width % groups:
        raise ValueError(f"{name}: width must be a positive multiple of {groups} (GroupNorm "
                         f"groups), got {width!r}")
    if len(input_shape) != 3:
        raise ValueError(f"{name}: input_shape must be (height, width, channels), got {input_shape!r}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for index, (filters, stride) in enumerate(
            ((width, 1), (2 * width, 2), (2 * width, 1), (2 * width, 1))):
        x = _torch_conv(x, filters, stride, f"conv{index + 1}")
        x = keras.layers.ReLU(name=f"relu{index + 1}")(x)
        x = keras.layers.GroupNormalization(
            groups=groups, epsilon=defaults.GROUPNORM_EPSILON, name=f"bn{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    if num_classes is not None:
        x = classifier(x, num_classes)
    return keras.Model(inputs, x, name=name)
