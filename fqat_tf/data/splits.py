"""Leave-domains-out splits with DomainBed's seeded hold-out, checked before any training.

`load_splits` reads a dataset, checks every argument and file, and returns per-domain sources:
the training part and the held-out validation part of every training domain, and every test
domain whole. The hold-out follows DomainBed's `train.py` exactly: domain i is shuffled with
`np.random.RandomState(seed_hash(seed, i))` and its first `int(n * holdout_fraction)` shuffled
positions are held out, so a seed selects the same validation images as in DomainBed.
"""
import dataclasses
import hashlib
import logging
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from fqat_tf import defaults
from fqat_tf.data import folder as folder_lib
from fqat_tf.data import rotated_mnist
from fqat_tf.data.registry import DataError, DatasetInfo, get_info, resolve_domains

_SOURCES = ("auto", "folder", "tfds")


def seed_hash(*args) -> int:
    """An integer in [0, 2**31) derived from `args`, as DomainBed's `misc.seed_hash`."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """The images of one split of one domain.

    Exactly one of `paths`, `images` and `tfds` holds the domain's data; `indices` picks this
    split's members from it (positions in the domain, sorted).

    Attributes:
        domain: domain name.
        domain_index: the domain's position in the dataset's domains.
        indices: positions in the domain of this split's images.
        labels: the whole domain's labels (None for TFDS, where they are read with the images).
        paths: the whole domain's image files.
        images: the whole domain's uint8 pixels (N, H, W, C).
        tfds: (builder name with config, split, data_dir) of a TFDS domain.
    """

    domain: str
    domain_index: int
    indices: np.ndarray
    labels: Optional[np.ndarray] = None
    paths: Optional[np.ndarray] = None
    images: Optional[np.ndarray] = None
    tfds: Optional[Tuple[str, str, Optional[str]]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: np.ndarray) -> "Source":
        """The same domain restricted to `indices` (positions in the domain)."""
        return dataclasses.replace(self, indices=np.sort(np.asarray(indices, np.int64)))

    def split_labels(self) -> Optional[np.ndarray]:
        """The labels of this split's images, in `indices` order (None for TFDS)."""
        return None if self.labels is None else self.labels[self.indices]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A dataset split for one leave-out run.

    Attributes:
        info: the dataset's info, with the domains, class count and input shape of this run.
        class_names: class names in label order.
        train_domains: the training domains, in dataset order (the order of the batch blocks).
        test_domains: the held-out test domains, in dataset order.
        train, val, test: domain name -> `Source`; `val` is the hold-out of each training
            domain (empty when the hold-out fraction is 0), `test` the test domains whole.
        seed: the hold-out seed.
        skipped_files: files left out because they are not readable images, and unsafe paths
            left out (`folder.read_folder_tree`).
    """

    info: DatasetInfo
    class_names: Tuple[str, ...]
    train_domains: Tuple[str, ...]
    test_domains: Tuple[str, ...]
    train: Dict[str, Source]
    val: Dict[str, Source]
    test: Dict[str, Source]
    seed: int
    skipped_files: Tuple[str, ...] = ()

    @property
    def domain_names(self) -> Tuple[str, ...]:
        return self.info.domains

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def holdout(n: int, fraction: float, seed: int, domain_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """DomainBed's `split_dataset` of one domain: returns (kept, held-out) positions, sorted."""
    keys = np.arange(n)
    np.random.RandomState(seed_hash(seed, domain_index)).shuffle(keys)
    n_out = int(n * fraction)
    return np.sort(keys[n_out:]), np.sort(keys[:n_out])


def _check_args(holdout_fraction, image_size, source, verify, info):
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction={holdout_fraction}; expected a value in [0, 1)")
    if source not in _SOURCES:
        raise DataError(f"source={source!r}; expected one of {_SOURCES}")
    if verify not in ("header", "decode"):
        raise DataError(f"verify={verify!r}; expected 'header' or 'decode'")
    if image_size is not None:
        if not info.imagenet:
            raise DataError(f"image_size applies to photo datasets; {info.name} images are "
                            f"{info.input_shape[:2]}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size={image_size!r}; expected a positive int")


def _read_folder(info, data_dir, verify, skip_bad_files, cache_dir):
    if info.name == "image_folder":
        root, domains = data_dir, None
    else:
        root, domains = folder_lib.dataset_root(data_dir, info.folder, info.domains), info.domains
    class_names, domains_read, skipped = folder_lib.read_folder_tree(
        root, domains, info.class_names, verify, skip_bad_files, cache_dir)
    if info.num_classes is not None and len(class_names) != info.num_classes:
        raise DataError(f"{root} has {len(class_names)} class folders per domain; {info.name} "
                        f"has {info.num_classes}")
    sources = [Source(d.name, i, np.arange(len(d.paths)), labels=d.labels, paths=d.paths)
               for i, d in enumerate(domains_read)]
    return tuple(d.name for d in domains_read), class_names, sources, skipped


def _read_rotated_mnist(info, data_dir):
    if info.name == "rotated_mnist_5k":
        images, labels = rotated_mnist.load_mnist_5k()
    else:
        images, labels = rotated_mnist.load_mnist_tfds(data_dir)
    domains = rotated_mnist.rotated_domains(images, labels, defaults.ROTATED_MNIST_ANGLES)
    sources = [Source(name, i, np.arange(len(y)), labels=y, images=x)
               for i, (name, (x, y)) in enumerate(zip(info.domains, domains))]
    return info.domains, tuple(str(c) for c in range(10)), sources, ()


def _read(info, data_dir, source, verify, skip_bad_files, cache_dir):
    if info.name.startswith("rotated_mnist"):
        return _read_rotated_mnist(info, data_dir)
    if source == "auto":
        source = "folder"
        if info.name == "domain_net" and not _has_folder_layout(info, data_dir):
            source = "tfds"
    if source == "tfds":
        if info.tfds_name is None:
            raise DataError(f"{info.name} has no TFDS builder; use source='folder'")
        from fqat_tf.data import tfds_builders  # Imports TFDS, which is slow; only here.
        class_names, domains = tfds_builders.read_tfds_domains(info, data_dir)
        sources = [Source(name, i, np.arange(n), tfds=key)
                   for i, (name, (n, key)) in enumerate(zip(info.domains, domains))]
        return info.domains, class_names, sources, ()
    return _read_folder(info, data_dir, verify, skip_bad_files, cache_dir)


def _has_folder_layout(info, data_dir):
    try:
        folder_lib.dataset_root(data_dir, info.folder, info.domains)
    except (DataError, FileNotFoundError):
        return False
    return True


def _known_domains(info, data_dir):
    if info.domains:
        return info.domains
    if data_dir is None:
        raise DataError("data_dir is required for image_folder (data_dir/<domain>/<class>/*)")
    return tuple(folder_lib.check_domains(data_dir))


def _choose_domains(domains, test_domains, train_domains):
    """Returns (training, test) domain names, checked."""
    test = resolve_domains(test_domains, domains, "test domain")
    if train_domains is None:
        train = tuple(d for d in domains if d not in test)
    else:
        train = resolve_domains(train_domains, domains, "training domain")
    both = [d for d in train if d in test]
    if both:
        raise DataError(f"{both} given both as test and as training domains")
    if not train:
        raise DataError(f"no training domain left: test domains {list(test)} are all of "
                        f"{list(domains)}")
    return train, test


def load_splits(name: str, data_dir: Optional[str] = None, test_domains=(0,),
                holdout_fraction: float = defaults.HOLDOUT_FRACTION, seed: int = 0,
                skip_bad_files: bool = False, *, train_domains: Optional[Sequence] = None,
                image_size: Optional[int] = None, source: str = "auto",
                verify: str = defaults.DATA_VERIFY, cache_dir: Optional[str] = None) -> Splits:
    """Reads and checks a dataset and splits it for one leave-domains-out run.

    Args:
        name: a key of `DATASETS`.
        data_dir: the data root: `data_dir/<folder>/<domain>/<class>/*` (or the dataset folder
            itself) for the folder layouts, the tree `data_dir/<domain>/<class>/*` for
            `image_folder`, the TFDS data folder for TFDS sources; unused by rotated_mnist_5k.
        test_domains: held-out domains, by name or index (one, or a sequence); may be empty.
        holdout_fraction: the fraction of every training domain held out for validation.
        seed: the hold-out seed (DomainBed's trial seed).
        skip_bad_files: leave out files that are not readable images, and unsafe paths
            (symlinks that loop or leave the data root, names that are not UTF-8), instead of
            raising; they are listed in `Splits.skipped_files` and logged.
        train_domains: the training domains; None takes every domain that is not a test domain.
        image_size: the square side the photos are fed at (default `defaults.IMAGE_SIZE`).
        source: "folder", "tfds", or "auto" (the folder layout where found; DomainNet falls back
            to TFDS's `domainnet`).
        verify: how far image files are checked: "header" or "decode" (every image decoded);
            a file checked before and unchanged since is not checked again (`manifest`).
        cache_dir: where the manifest of checked files is kept; default `$FQAT_TF_CACHE`, else
            the data root when writable, else `~/.cache/fqat_tf` (`manifest.location`).

    Returns:
        The `Splits`.

    Raises:
        DataError: an unknown dataset or domain, a test domain that is also a training domain,
            no training domain, bad arguments, or bad files or paths (see
            `folder.read_folder_tree`).
        FileNotFoundError: a missing data folder or domain folder.
    """
    info = get_info(name)
    _check_args(holdout_fraction, image_size, source, verify, info)
    # Domain arguments are checked before the (slow) file checks.
    train, test = _choose_domains(_known_domains(info, data_dir), test_domains, train_domains)
    domains, class_names, whole, skipped = _read(info, data_dir, source, verify, skip_bad_files,
                                                 cache_dir)
    if skipped:
        logging.getLogger(__name__).warning(
            "skipped %d file(s) that are not readable images or unsafe paths, e.g. %s",
            len(skipped), skipped[0])
    size = image_size or info.input_shape[0]
    info = dataclasses.replace(
        info, domains=domains, num_classes=len(class_names), class_names=tuple(class_names),
        input_shape=(size, size, info.input_shape[2]) if info.imagenet else info.input_shape)

    train_sources, val_sources, test_sources = _assign(whole, train, test, holdout_fraction, seed)
    return Splits(info=info, class_names=tuple(class_names),
                  train_domains=tuple(d for d in domains if d in train),
                  test_domains=tuple(d for d in domains if d in test), train=train_sources,
                  val=val_sources, test=test_sources, seed=seed, skipped_files=tuple(skipped))


def _assign(whole, train, test, holdout_fraction, seed):
    """Splits every training domain into kept and held-out parts; keeps test domains whole."""
    train_sources, val_sources, test_sources = {}, {}, {}
    for src in whole:
        if src.domain in test:
            test_sources[src.domain] = src
        elif src.domain in train:
            # holdout_fraction < 1 always leaves at least one image to train on.
            kept, held = holdout(len(src), holdout_fraction, seed, src.domain_index)
            train_sources[src.domain] = src.subset(kept)
            if len(held):
                val_sources[src.domain] = src.subset(held)
    return train_sources, val_sources, test_sources
