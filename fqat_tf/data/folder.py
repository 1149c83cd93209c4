"""The DomainBed folder layout `ROOT/<domain>/<class>/*`, read and checked before training.

Files are listed as torchvision's `ImageFolder` lists them (classes sorted, files found
recursively and sorted), so an index into a domain names the same image as in DomainBed. Every
file is checked up front: a file that is not a readable image would otherwise stop training
hours later, so it is reported by name here, or skipped and counted when asked. The check is
remembered (`manifest`), so later start-ups check only new or changed files.

Unlike `ImageFolder` (`os.walk(followlinks=True)`), the listing refuses what would make a tree
mean something else than it shows: a symlink inside a class folder that loops back to a folder
containing it (followed, it lists the same images again and again), a symlink whose target
leaves the data root (the real folders of the root, the domain and the class), and a name that
is not valid UTF-8 (TensorFlow takes paths as UTF-8). Each is named in a `DataError`, or left
out with a warning naming it under `skip_bad_files`. Symlinks to files or folders inside the
root are followed.
"""
import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fqat_tf.data import manifest
from fqat_tf.data.registry import DataError

log = logging.getLogger(__name__)

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


def _utf8(name: str) -> bool:
    # Python decodes undecodable bytes of a file name to lone surrogates.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: str) -> str:
    """A path as an error shows it: the bytes' repr when it is not valid UTF-8."""
    return path if _utf8(path) else repr(os.fsencode(path))


def list_subdirs(path: str) -> List[str]:
    """Returns the sorted names of the visible subfolders of `path`.

    Raises:
        DataError: a subfolder's name is not valid UTF-8.
    """
    with os.scandir(path) as it:
        names = sorted(e.name for e in it if e.is_dir() and _visible(e.name))
    for name in names:
        if not _utf8(name):
            raise DataError(f"folder {_shown(os.path.join(path, name))} under {path}: the name "
                            f"is not valid UTF-8; rename it")
    return names


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclasses.dataclass
class _Listing:
    files: List[str] = dataclasses.field(default_factory=list)
    unsafe: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why)


def _walk(folder: str, bounds: Sequence[str], walking: List[str], listing: _Listing) -> None:
    """Lists `folder` as `os.walk(followlinks=True)` would, top-down and sorted, refusing
    unsafe entries; `walking` holds the real paths of the folders being walked."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
    subfolders = []
    for entry in entries:
        path = entry.path
        if not _utf8(entry.name):
            listing.unsafe.append((path, "its name is not valid UTF-8"))
        elif entry.is_symlink():
            target = os.path.realpath(path)
            if not any(_inside(target, b) for b in bounds):
                listing.unsafe.append((path, f"a symlink to {target}, outside the data root"))
            elif not os.path.isdir(target):
                listing.files.append(path)  # A dangling link fails the image check, named.
            elif any(_inside(w, target) for w in walking):
                listing.unsafe.append((path, f"a symlink to {target}, a folder that contains "
                                             f"it: it loops"))
            else:
                subfolders.append((path, target))
        elif entry.is_dir():
            subfolders.append((path, os.path.realpath(path)))
        else:
            listing.files.append(path)
    for path, real in subfolders:
        _walk(path, bounds, walking + [real], listing)


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
                     skip_bad_files: bool = False, cache_dir: Optional[str] = None
                     ) -> Tuple[Tuple[str, ...], List[FolderDomain], Tuple[str, ...]]:
    """Lists and checks a tree `root/<domain>/<class>/*` of images.

    Args:
        root: the tree's root folder.
        domains: the domain folders to read, in this order; None discovers them (sorted).
        class_names: the class folders every domain must have; None takes those of the first
            domain and requires the others to match.
        verify: how far to check the files, see `find_bad_files`.
        skip_bad_files: leave out files that are not readable images and unsafe paths (see
            above) instead of raising.
        cache_dir: where the manifest of checked files is kept (`manifest.location`).

    Returns:
        (class names, one `FolderDomain` per domain, the skipped files and unsafe paths).

    Raises:
        FileNotFoundError: `root` or a domain folder does not exist.
        DataError: no domain folders, class folders that differ between domains, an empty
            class, a folder name that is not valid UTF-8, or (without `skip_bad_files`) a file
            that is not a readable image or an unsafe path.
    """
    domains = check_domains(root, domains)
    tree = {d: list_subdirs(os.path.join(root, d)) for d in domains}
    for domain, classes in tree.items():
        if not classes:
            raise DataError(f"domain folder {os.path.join(root, domain)} has no class folders")
    _check_classes(tree, class_names, root)
    classes = tuple(tree[domains[0]])

    files, unsafe = _list_classes(root, domains, classes)
    if unsafe:
        shown = [f"{_shown(path)}: {why}" for path, why in unsafe]
        if not skip_bad_files:
            raise DataError(f"{len(unsafe)} unsafe path(s) under the data root {root}:"
                            f"{_listed(shown)}\nremove or fix them, or pass skip_bad_files=True "
                            f"to leave them out")
        log.warning("left out %d unsafe path(s) under the data root %s:%s", len(unsafe), root,
                    _listed(shown))
    every_file = [p for key in files for p in files[key]]
    bad = manifest.check_files(root, every_file, domains, verify, find_bad_files, cache_dir)
    if bad and not skip_bad_files:
        raise DataError(f"{len(bad)} file(s) under {root} are not readable images:{_listed(bad)}"
                        f"\nremove them, or pass skip_bad_files=True to leave them out")
    skipped = tuple(bad) + tuple(_shown(path) for path, _ in unsafe)
    return classes, _label_files(root, domains, classes, files, set(bad)), skipped


def _listed(lines: Sequence[str], most: int = 10) -> str:
    more = f"\n  ... and {len(lines) - most} more" if len(lines) > most else ""
    return "".join(f"\n  {line}" for line in lines[:most]) + more


def _list_classes(root, domains, classes):
    """(domain, class) -> files, and the unsafe paths found, for every class folder."""
    root_real = os.path.realpath(root)
    files, unsafe = {}, []
    for d in domains:
        domain_real = os.path.realpath(os.path.join(root, d))
        for c in classes:
            class_dir = os.path.join(root, d, c)
            class_real = os.path.realpath(class_dir)
            listing = _Listing()
            _walk(class_dir, (root_real, domain_real, class_real), [class_real], listing)
            files[(d, c)] = listing.files
            unsafe.extend(listing.unsafe)
    return files, unsafe


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
