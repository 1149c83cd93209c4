"""Generated image trees in the DomainBed folder layout, for tests, benchmarks and demos.

`write_image_tree` writes `root/<domain>/<class>/<n>.<png|jpg>`. With `noise=0` every image is
one flat colour whose grey level encodes its class (`class_level`), so a model that reads the
mean pixel knows the label: evaluation code can be checked against exact expected accuracies.
With `smooth=True` the images are smooth random colour fields, which JPEG-compress and decode
like photographs rather than like white noise (used for throughput measurements).
"""
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

_LEVEL_STEP, _LEVEL_OFFSET = 30, 10


def class_level(label: int) -> int:
    """The grey level (0-255) of a flat image of class `label`."""
    return _LEVEL_OFFSET + _LEVEL_STEP * label


def level_class(level: float) -> int:
    """Inverse of `class_level`: the class whose level is nearest `level`."""
    return int(round((level - _LEVEL_OFFSET) / _LEVEL_STEP))


def _smooth_field(rng: np.random.RandomState, size: Tuple[int, int]) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
    field = tf.image.resize(coarse[None], size, method="bicubic")[0].numpy()
    field += rng.normal(0, 8, size=field.shape)
    return np.clip(field, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    if fmt == "png":
        return tf.io.encode_png(pixels).numpy()
    if fmt in ("jpg", "jpeg"):
        return tf.io.encode_jpeg(pixels, quality=90).numpy()
    raise ValueError(f"image format {fmt!r}; expected 'png', 'jpg' or 'jpeg'")


def write_image_tree(root: str, domains: Sequence[str], classes: Sequence[str],
                     images_per_class=2, size: Tuple[int, int] = (12, 12),
                     formats: Sequence[str] = ("png",), noise: float = 20.0, smooth: bool = False,
                     seed: int = 0) -> Dict[Tuple[str, str], list]:
    """Writes a tree `root/<domain>/<class>/<i>.<fmt>` of RGB images.

    Args:
        root: the tree's root (created).
        domains: domain folder names.
        classes: class folder names; class k's flat level is `class_level(k)`.
        images_per_class: an int, or a dict (domain, class) -> count for uneven trees.
        size: (height, width) of every image.
        formats: file formats used in turn ("png", "jpg", "jpeg").
        noise: standard deviation of per-pixel noise added to the flat level (0: flat image).
        smooth: write smooth random colour fields instead of class levels.
        seed: numpy seed of the pixel content.

    Returns:
        (domain, class) -> the written paths, in file-name order.
    """
    rng = np.random.RandomState(seed)
    written = {}
    for domain in domains:
        for label, name in enumerate(classes):
            folder = os.path.join(root, domain, name)
            os.makedirs(folder, exist_ok=True)
            count = (images_per_class[(domain, name)] if isinstance(images_per_class, dict)
                     else images_per_class)
            paths = []
            for i in range(count):
                if smooth:
                    pixels = _smooth_field(rng, size)
                else:
                    pixels = class_level(label) + rng.normal(0, noise, size=(*size, 3))
                    pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
                fmt = formats[i % len(formats)]
                name_i = f"{i:04d}.{fmt}"
                path = os.path.join(folder, name_i)
                # Written under a hidden name, then renamed: a reader never sees half a file.
                tmp = os.path.join(folder, f".{name_i}.tmp")
                with open(tmp, "wb") as f:
                    f.write(_encode(pixels, fmt))
                os.replace(tmp, path)
                paths.append(path)
            written[(domain, name)] = paths
    return written
