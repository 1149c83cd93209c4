"""Converts a MoCo-v2 checkpoint into weights of the Keras ResNet-50 of :mod:`fqat_tf.models`.

Usage::

    python -m fqat_tf.models.convert_moco \\
        --checkpoint moco_v2_800ep_pretrain.pth.tar --out resnet50_mocov2.weights.h5

The query encoder ``module.encoder_q.*`` of the checkpoint's ``state_dict`` is mapped onto the
headless ``resnet50(None)``; its projection head (``module.encoder_q.fc*``), the key encoder and
the queue are not part of the backbone and are left out. The result is a Keras ``.weights.h5``
that :func:`fqat_tf.models.load_init` copies into a ResNet-50 with any classifier.

PyTorch is needed only here (the ``torch`` extra). A checkpoint is untrusted input: it is read
with ``weights_only=True``, which refuses pickled code, and anything that is not a mapping of
names to tensors is refused as well. Missing, unexpected or wrongly shaped tensors are all
reported by name before anything is written, and the output appears atomically.
"""
import os
import pickle
import sys
import uuid

import keras
import numpy as np

from fqat_tf import cli
from fqat_tf.models.init import InitError
from fqat_tf.models.resnet import resnet50, torch_module_name

MOCO_PREFIX = "module.encoder_q."


class TorchMissingError(InitError, ImportError):
    """Reading a PyTorch checkpoint needs torch, which is not installed."""

_HEAD_PREFIX = "fc"
_LISTED_KEYS = 10


def _import_torch(path):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise TorchMissingError(
            f"reading the PyTorch checkpoint {path} needs torch: pip install 'fqat_tf[torch]', "
            "or convert it elsewhere with python -m fqat_tf.models.convert_moco") from err
    return torch


def _load_failure_reason(err):
    """The diagnostic part of a torch.load error, without torch's advice to drop weights_only."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    kept = [p for p in paragraphs
            if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(kept) or type(err).__name__


def load_checkpoint(path, prefix=MOCO_PREFIX):
    """Reads the backbone tensors of a MoCo-v2 checkpoint as numpy arrays.

    Args:
        path: A ``.pth.tar`` written by MoCo's ``main_moco.py`` (the state dict under
            ``"state_dict"``), or a bare state dict.
        prefix: Key prefix of the encoder to extract.

    Returns:
        A dict from torchvision key (``"layer1.0.conv1.weight"``) to float32 array, without the
        projection head and without ``num_batches_tracked`` counters.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: torch is not installed.
        ValueError: The file is not a plain state dict, or holds no key under ``prefix``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise InitError(f"{path}: not a plain PyTorch state-dict checkpoint (weights_only "
                         f"loading refused it): {_load_failure_reason(err)}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InitError(f"{path}: not a state dict (expected a mapping of names to tensors, "
                         f"optionally under 'state_dict'; got {type(obj).__name__})")
    encoder = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    if not encoder:
        raise InitError(f"{path}: no key starts with {prefix!r}; first keys: "
                         f"{sorted(obj)[:_LISTED_KEYS]}")
    return {k: v.detach().to(torch.float32).numpy() for k, v in encoder.items()
            if not k.startswith(_HEAD_PREFIX) and not k.endswith(".num_batches_tracked")}


def _targets(model):
    """Maps each torchvision key to (Keras variable, its torch shape, torch -> Keras transform)."""
    targets = {}
    for layer in model.layers:
        module = torch_module_name(layer.name)
        if isinstance(layer, keras.layers.Conv2D):
            # torch stores conv kernels as (out, in, h, w); Keras as (h, w, in, out).
            h, w, c_in, c_out = layer.kernel.shape
            targets[f"{module}.weight"] = (layer.kernel, (c_out, c_in, h, w),
                                           lambda a: np.transpose(a, (2, 3, 1, 0)))
        elif isinstance(layer, keras.layers.BatchNormalization):
            for key, var in (("weight", layer.gamma), ("bias", layer.beta),
                             ("running_mean", layer.moving_mean),
                             ("running_var", layer.moving_variance)):
                targets[f"{module}.{key}"] = (var, tuple(var.shape), lambda a: a)
    return targets


def _listing(keys):
    keys = sorted(keys)
    more = f" ... and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


def assign_state_dict(model, state, source):
    """Checks every tensor of ``state`` against ``model``, then assigns them all.

    Nothing is assigned unless the key sets match exactly and every shape agrees, so a failed
    call leaves ``model`` untouched.

    Args:
        model: A model built by :func:`fqat_tf.models.resnet50` (with or without classifier; the
            classifier is not touched).
        state: torchvision key -> array, as returned by :func:`load_checkpoint`.
        source: Name of where ``state`` came from, used in error messages.

    Returns:
        The number of tensors assigned.

    Raises:
        ValueError: Naming the missing keys, the unexpected keys and the shape mismatches.
    """
    targets = _targets(model)
    problems = []
    missing = set(targets) - set(state)
    extra = set(state) - set(targets)
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if extra:
        problems.append(f"unexpected keys ({len(extra)}): {_listing(extra)}")
    wrong = [f"{key} checkpoint {tuple(state[key].shape)} vs model {targets[key][1]}"
             for key in sorted(set(targets) & set(state))
             if tuple(state[key].shape) != targets[key][1]]
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:_LISTED_KEYS])
                        + (f" ... and {len(wrong) - _LISTED_KEYS} more"
                           if len(wrong) > _LISTED_KEYS else ""))
    if problems:
        raise InitError(f"{source} does not fit {model.name}: " + " | ".join(problems))
    for key, (var, _, transform) in targets.items():
        var.assign(transform(state[key]))
    return len(targets)


def _check_out(out):
    if not out.endswith(".weights.h5"):
        raise InitError(f"--out must end in .weights.h5 (Keras's weights format), got {out}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out directory does not exist: {os.path.dirname(out)}")


def save_weights_atomically(model, out):
    """Writes ``model.save_weights`` to a temporary file beside ``out``, then renames it."""
    _check_out(out)
    # Keras insists on the .weights.h5 ending, so the unique temporary name keeps it too.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)),
                       f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp.weights.h5")
    try:
        model.save_weights(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(checkpoint, out, width=64, prefix=MOCO_PREFIX):
    """Converts a MoCo-v2 checkpoint to a Keras weights file of the headless ResNet-50.

    Args:
        checkpoint: Path of the ``.pth.tar``.
        out: Output path, ending in ``.weights.h5``.
        width: Stem width of the ResNet-50 the checkpoint holds (MoCo-v2: 64).
        prefix: Key prefix of the encoder (MoCo: ``module.encoder_q.``).

    Returns:
        The number of tensors converted.

    Raises:
        FileNotFoundError, ImportError, ValueError: As :func:`load_checkpoint` and
            :func:`assign_state_dict`; ``out`` is not created in any of these cases.
    """
    _check_out(out)
    state = load_checkpoint(checkpoint, prefix)
    stem = state.get("conv1.weight")
    if stem is not None and stem.ndim == 4 and stem.shape[0] != width:
        raise InitError(f"{checkpoint}: conv1.weight has {stem.shape[0]} output channels, the "
                         f"model has width {width}; pass --width {stem.shape[0]} if intended")
    model = resnet50(None, input_shape=(None, None, 3), width=width)
    count = assign_state_dict(model, state, checkpoint)
    save_weights_atomically(model, out)
    return count


PROG = "fqat_tf.models.convert_moco"


def main(argv=None):
    """Command-line entry point; see the module docstring."""
    parser = cli.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Convert a MoCo-v2 ResNet-50 checkpoint to Keras weights.")
    parser.add_argument("--checkpoint", required=True, help="MoCo-v2 .pth.tar")
    parser.add_argument("--out", required=True, help="output .weights.h5")
    parser.add_argument("--width", type=int, default=64, help="ResNet-50 stem width")
    parser.add_argument("--prefix", default=MOCO_PREFIX, help="encoder key prefix")
    args = parser.parse_args(argv)

    def body():
        count = convert(args.checkpoint, args.out, args.width, args.prefix)
        print(f"wrote {args.out}: {count} tensors from {args.checkpoint}")

    return cli.run(PROG, body, args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
