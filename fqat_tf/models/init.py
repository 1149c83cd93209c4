"""Initialisation of a backbone from pretrained weights: ``--init=none|imagenet|mocov2:PATH``.

The paper initialises from MoCo-v2 (self-supervised on ImageNet without labels), following Yu et
al. [48]: ImageNet *supervised* weights leak information about the test domains of the
DomainBed benchmarks, which inflates out-of-distribution accuracy (the paper measures 4-bit LSQ
on PACS Art going from 51.07 to 76.51 by this change alone). ``imagenet`` is therefore only for
comparison with work that uses it.
"""
import os
import re
import warnings

import keras
import numpy as np

from fqat_tf import defaults
from fqat_tf.errors import UserError
from fqat_tf.models.resnet import is_resnet50, resnet50



class InitError(UserError):
    """An initial checkpoint (`--init`) that cannot be used, named with the reason."""


class InitDownloadError(InitError, RuntimeError):
    """The ImageNet weights cannot be obtained (no network, no cached file)."""


# keras.applications' ResNet50 expects Caffe-style input ("caffe" mode of imagenet_utils): BGR,
# 0..255, minus this per-channel mean (in BGR order), no scaling.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_KERAS_APP_BN_EPSILON = 1.001e-5


def load_init(model, spec):
    """Loads pretrained weights into ``model`` in place, according to ``spec``.

    Args:
        model: A model built by :func:`fqat_tf.models.build_backbone`, before quantization.
        spec: ``"none"`` (keep the random initialisation), ``"mocov2:PATH"`` (MoCo-v2 ResNet-50;
            PATH is a ``.weights.h5`` written by ``python -m fqat_tf.models.convert_moco`` or the
            original ``.pth.tar``, converted in memory when torch is installed) or ``"imagenet"``
            (keras.applications' supervised ResNet50 weights, downloaded by Keras). Supervised
            ImageNet weights leak test-domain information into DomainBed evaluations (paper §3,
            Yu et al. [48]); the paper's results use ``mocov2``. The classifier head always keeps
            its random initialisation.

    Returns:
        A one-line description of what was loaded.

    Raises:
        ValueError: An unknown spec, a model the weights do not fit, or an unreadable file.
        FileNotFoundError: The mocov2 PATH does not exist.
        ImportError: A ``.pth.tar`` is given and torch is not installed.
        RuntimeError: The ImageNet weights cannot be downloaded.
    """
    if spec == "none":
        return "none: random initialisation"
    if spec == "imagenet":
        return _load_imagenet(model)
    if isinstance(spec, str) and spec.startswith("mocov2:"):
        path = spec[len("mocov2:"):]
        if not path:
            raise InitError("--init=mocov2:PATH needs a PATH (a .weights.h5 or .pth.tar)")
        return _load_mocov2(model, path)
    raise InitError(f"--init={spec!r}: expected 'none', 'imagenet' or 'mocov2:PATH'")


def _require_resnet50(model, spec):
    if not is_resnet50(model):
        raise InitError(f"--init={spec} holds ResNet-50 weights; model {model.name!r} is not a "
                         "resnet50 backbone")


def _load_mocov2(model, path):
    _require_resnet50(model, f"mocov2:{path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init=mocov2:{path}: file not found")
    if path.endswith(".weights.h5"):
        count = _copy_converted(model, path)
    else:
        # Imported here so that `python -m fqat_tf.models.convert_moco` does not find its own
        # module already imported by the package (runpy warns about that).
        from fqat_tf.models import convert_moco  # pylint: disable=import-outside-toplevel
        count = convert_moco.assign_state_dict(model, convert_moco.load_checkpoint(path), path)
    return f"mocov2: {count} backbone tensors from {path}; classifier randomly initialised"


def _copy_converted(model, path):
    """Loads a converted headless ResNet-50 and copies it layer by layer, by name."""
    conv1 = model.get_layer("conv1")
    width, channels = conv1.filters, conv1.kernel.shape[2]
    source = resnet50(None, input_shape=(None, None, channels), width=width)
    # A mismatched file makes Keras warn once per layer before it raises; the error below says
    # it all, so the warnings are only passed on when the load succeeds.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            source.load_weights(path)
        except (ValueError, OSError) as err:
            raise InitError(
                f"--init=mocov2:{path}: not a converted ResNet-50 of width {width} (write one "
                f"with python -m fqat_tf.models.convert_moco): {err}") from err
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    count = 0
    for layer in source.layers:
        for target, value in zip(model.get_layer(layer.name).weights, layer.weights):
            target.assign(value)
            count += 1
    return count


def _fetch_imagenet_resnet50():
    try:
        return keras.applications.ResNet50(
            include_top=False, weights="imagenet", input_shape=(None, None, 3))
    # Keras's get_file reports a failed download as a plain Exception.
    except Exception as err:  # pylint: disable=broad-exception-caught
        raise InitDownloadError(
            "--init=imagenet: could not obtain keras.applications ResNet50 ImageNet weights "
            f"({err}); without network access place resnet50_weights_tf_dim_ordering_tf_kernels_"
            "notop.h5 in ~/.keras/models/, or use --init=mocov2:PATH") from err


def _load_imagenet(model):
    _require_resnet50(model, "imagenet")
    conv1 = model.get_layer("conv1")
    if conv1.filters != 64 or conv1.kernel.shape[2] != 3:
        raise InitError("--init=imagenet needs a full-width (64) ResNet-50 on RGB input, got "
                         f"width {conv1.filters} and {conv1.kernel.shape[2]} input channels")
    count = map_imagenet_weights(_fetch_imagenet_resnet50(), model)
    return (f"imagenet: {count} tensors of keras.applications ResNet50 (supervised; leaks "
            "test-domain information); classifier randomly initialised")


def _app_layer_name(conv_name):
    """keras.applications' name of the conv matching one of ours (``layer2_0_conv3``)."""
    if conv_name == "conv1":
        return "conv1_conv"
    match = re.fullmatch(r"layer(\d)_(\d+)_(?:conv(\d)|downsample_conv)", conv_name)
    index = match.group(3) or "0"
    return f"conv{int(match.group(1)) + 1}_block{int(match.group(2)) + 1}_{index}_conv"


def map_imagenet_weights(app, model):
    """Copies keras.applications ResNet50 weights into a torchvision-layout ResNet-50.

    Both have the same tensor shapes; the differences are absorbed exactly where possible:

    * keras.applications' convs have a bias, ours do not; a bias ``b`` before BatchNorm equals
      a shift of the moving mean by ``-b``, and the BatchNorm epsilon difference (1.001e-5
      there) is added to the moving variance;
    * keras.applications expects Caffe input (BGR, 0..255, minus a mean), ours normalised RGB
      (``defaults.IMAGENET_MEAN``/``IMAGENET_STD``); the affine map between the two is folded
      into ``conv1``, exact except where the 7x7 window overlaps the zero padding;
    * keras.applications strides on the first 1x1 conv of a block, ours on the 3x3 conv
      (torchvision's "v1.5"), which the weights tolerate but do not reproduce exactly.

    Args:
        app: ``keras.applications.ResNet50(include_top=False)`` with its weights.
        model: A full-width :func:`fqat_tf.models.resnet50`.

    Returns:
        The number of tensors assigned.
    """
    std255 = 255.0 * np.asarray(defaults.IMAGENET_STD, np.float32)
    mean255 = 255.0 * np.asarray(defaults.IMAGENET_MEAN, np.float32)
    count = 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        app_conv = app.get_layer(_app_layer_name(layer.name))
        kernel, bias = (np.asarray(w) for w in app_conv.get_weights())
        if layer.name == "conv1":
            kernel = kernel[:, :, ::-1, :]  # BGR input channels -> RGB
            bias = bias + np.einsum("hwco,c->o", kernel, mean255 - _CAFFE_MEAN_BGR[::-1])
            kernel = kernel * std255[None, None, :, None]
        gamma, beta, mean, var = app.get_layer(app_conv.name[:-4] + "bn").get_weights()
        bn = model.get_layer(layer.name.replace("conv", "bn"))
        layer.kernel.assign(kernel)
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
        bn.moving_mean.assign(mean - bias)
        bn.moving_variance.assign(var + (_KERAS_APP_BN_EPSILON - bn.epsilon))
        count += 5
    return count
