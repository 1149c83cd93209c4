"""The DomainBed folder layout `ROOT/<domain>/<class>/*`, read and checked before training.

Files are listed as torchvision's `ImageFolder` lists them (classes sorted, files found
recursively and sorted), so an index into a domain names the same image as in DomainBed. Every
file is checked up front: a file that is not a readable image would otherwise stop training
hours later, so it is reported by name here, or skipped and counted when asked.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fqat_tf.data.registry import DataError

# Leading bytes of the formats `tf.io.decode_image` reads.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_VERIFY_MODES = ("header", "decode")


@dataclasses.dataclass(frozen=True)
class FolderDomain:
    """One domain of a folder tree: its image files and their labels."""

    name: str
    paths: np.ndarray     # str, one per image, in ImageFolder order
    labels: np.ndarray    # int64 class ids into the tree's class names


def _visible(name: str) -> bool:
    # Hidden entries (.DS_Store, ._foo.jpg from macOS archives, .ipynb_checkpoints) are not data.
    return not name.startswith(".")


def list_subdirs(path: str) -> List[str]:
    """Returns the sorted names of the visible subfolders of `path`."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and _visible(e.name))


def _list_files(class_dir: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
    return found


def _is_image_header(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(m) for m in _MAGIC)


def _undecodable(paths: Sequence[str]) -> List[str]:
    """Returns the paths among `paths` that TensorFlow cannot decode, decoding in parallel."""
    if not paths:
        return []

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        # Returning a value computed from the pixels keeps the decode from being pruned.
        return path, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    decoded = set()
    for batch, _ in ds.ignore_errors().batch(1024):
        decoded.update(p.decode("utf-8") for p in batch.numpy())
    return [p for p in paths if p not in decoded]


def find_bad_files(paths: Sequence[str], verify: str = "decode") -> List[str]:
    """Returns the files among `paths` that are not readable images, in input order.

    Args:
        paths: image files.
        verify: "header" checks the leading bytes only (fast: catches non-image and empty
            files); "decode" also decodes every image (catches truncated or damaged ones).

    Raises:
        DataError: unknown `verify` mode.
    """
    if verify not in _VERIFY_MODES:
        raise DataError(f"verify={verify!r}; expected one of {_VERIFY_MODES}")
    bad = [p for p in paths if not _is_image_header(p)]
    if verify == "decode":
        bad_set = set(bad)
        bad_set.update(_undecodable([p for p in paths if p not in bad_set]))
        bad = [p for p in paths if p in bad_set]
    return bad


def _check_classes(tree: Dict[str, List[str]], expected: Optional[Sequence[str]], root: str):
    domains = list(tree)
    reference_domain = domains[0]
    reference = tree[reference_domain] if expected is None else list(expected)
    source = f"domain {reference_domain!r}" if expected is None else "the dataset's class list"
    for domain in domains:
        classes = tree[domain]
        if classes != reference:
            missing = sorted(set(reference) - set(classes))
            extra = sorted(set(classes) - set(reference))
            raise DataError(
                f"class folders of domain {domain!r} under {root} differ from {source}: "
                f"missing {missing}, unexpected {extra}; every domain must have the same "
                f"class folders")


def check_domains(root: str, domains: Optional[Sequence[str]] = None) -> List[str]:
    """Returns the domain folders of `root` (`domains`, or the sorted subfolders if None).

    Raises:
        FileNotFoundError: `root` or a domain folder does not exist.
        DataError: `root` has no domain folders.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root} does not exist")
    if domains is None:
        domains = list_subdirs(root)
        if not domains:
            raise DataError(f"no domain folders under {root}; expected ROOT/<domain>/<class>/*")
    for domain in domains:
        if not os.path.isdir(os.path.join(root, domain)):
            raise FileNotFoundError(
                f"domain folder {os.path.join(root, domain)} does not exist (expected domains: "
                f"{list(domains)})")
    return list(domains)


def read_folder_tree(root: str, domains: Optional[Sequence[str]] = None,
                     class_names: Optional[Sequence[str]] = None, verify: str = "decode",
                     skip_bad_files: bool = False
                     ) -> Tuple[Tuple[str, ...], List[FolderDomain], Tuple[str, ...]]:
    """Lists and checks a tree `root/<domain>/<class>/*` of images.

    Args:
        root: the tree's root folder.
        domains: the domain folders to read, in this order; None discovers them (sorted).
        class_names: the class folders every domain must have; None takes those of the first
            domain and requires the others to match.
        verify: how far to check the files, see `find_bad_files`.
        skip_bad_files: leave out files that are not readable images instead of raising.

    Returns:
        (class names, one `FolderDomain` per domain, the skipped files).

    Raises:
        FileNotFoundError: `root` or a domain folder does not exist.
        DataError: no domain folders, class folders that differ between domains, an empty
            class, or (without `skip_bad_files`) a file that is not a readable image.
    """
    domains = check_domains(root, domains)
    tree = {d: list_subdirs(os.path.join(root, d)) for d in domains}
    for domain, classes in tree.items():
        if not classes:
            raise DataError(f"domain folder {os.path.join(root, domain)} has no class folders")
    _check_classes(tree, class_names, root)
    classes = tuple(tree[domains[0]])

    files = {(d, c): _list_files(os.path.join(root, d, c)) for d in domains for c in classes}
    every_file = [p for key in files for p in files[key]]
    bad = find_bad_files(every_file, verify)
    if bad and not skip_bad_files:
        shown = "\n  ".join(bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(
            f"{len(bad)} file(s) under {root} are not readable images:\n  {shown}{more}\n"
            f"remove them, or pass skip_bad_files=True to leave them out")
    return classes, _label_files(root, domains, classes, files, set(bad)), tuple(bad)


def _label_files(root, domains, classes, files, bad) -> List[FolderDomain]:
    out = []
    for domain in domains:
        paths, labels = [], []
        for label, c in enumerate(classes):
            kept = [p for p in files[(domain, c)] if p not in bad]
            if not kept:
                raise DataError(f"class folder {os.path.join(root, domain, c)} has no images")
            paths.extend(kept)
            labels.extend([label] * len(kept))
        out.append(FolderDomain(domain, np.array(paths, dtype=str),
                                np.array(labels, dtype=np.int64)))
    return out


def dataset_root(data_dir: Optional[str], folder: str, domains: Sequence[str]) -> str:
    """Finds a dataset's folder: `data_dir/<folder>`, or `data_dir` itself if it holds the domains.

    Raises:
        DataError: `data_dir` is None.
        FileNotFoundError: neither place holds the dataset.
    """
    if data_dir is None:
        raise DataError(f"data_dir is required to read the {folder} folder layout "
                        f"(data_dir/{folder}/<domain>/<class>/*)")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir} does not exist")
    nested = os.path.join(data_dir, folder)
    if os.path.isdir(nested):
        return nested
    if any(os.path.isdir(os.path.join(data_dir, d)) for d in domains):
        return data_dir
    raise FileNotFoundError(
        f"no {folder} data under {data_dir}: expected {nested}/<domain>/<class>/* with domains "
        f"{list(domains)}")
