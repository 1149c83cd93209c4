"""Backbones (Keras 3 functional models) and their initialisation.

Every backbone maps images to logits; its first ``Conv2D`` is named ``conv1`` and its last layer
is the ``Dense`` named ``classifier``, whose output is the model output. Activations are
separate ``ReLU`` layers and there is no dropout. Backbones are found through the plain dict
:data:`BACKBONES`.
"""
from fqat_tf.models.init import load_init
from fqat_tf.models.mnist_cnn import mnist_cnn
from fqat_tf.models.resnet import resnet18, resnet50

BACKBONES = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "mnist_cnn": mnist_cnn,
}


def build_backbone(name, num_classes, input_shape, width=None):
    """Builds a backbone by name.

    Args:
        name: A key of :data:`BACKBONES`.
        num_classes: Number of logits of the classifier.
        input_shape: ``(height, width, channels)`` of the input images.
        width: Channel width of the backbone's first stage; ``None`` for the published width.

    Returns:
        A functional ``keras.Model``.

    Raises:
        ValueError: ``name`` is not a known backbone.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    kwargs = {} if width is None else {"width": width}
    return BACKBONES[name](num_classes, input_shape=tuple(input_shape), **kwargs)


__all__ = ["BACKBONES", "build_backbone", "load_init", "mnist_cnn", "resnet18", "resnet50"]
