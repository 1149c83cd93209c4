"""The dataset registry: domains, classes, shapes, domain names and indices, seed hashing."""
import hashlib

import pytest

from fqat_tf import defaults
from fqat_tf.data import DATASETS, DOMAINNET_GROUPS, DataError, get_info, resolve_domains
from fqat_tf.data import registry, seed_hash


@pytest.mark.parametrize("name, n_domains, n_classes, shape, imagenet", [
    ("pacs", 4, 7, (224, 224, 3), True),
    ("office_home", 4, 65, (224, 224, 3), True),
    ("domain_net", 6, 345, (224, 224, 3), True),
    ("rotated_mnist", 6, 10, (28, 28, 1), False),
    ("rotated_mnist_5k", 6, 10, (28, 28, 1), False),
])
def test_registered_datasets(name, n_domains, n_classes, shape, imagenet):
    info = DATASETS[name]
    assert info.name == name
    assert len(info.domains) == n_domains
    assert info.num_classes == n_classes
    assert info.input_shape == shape
    assert info.imagenet is imagenet
    if info.class_names is not None:
        assert len(info.class_names) == n_classes
        # Label order is ImageFolder's: sorted folder names.
        assert list(info.class_names) == sorted(info.class_names)


def test_domain_names_follow_domainbed():
    assert DATASETS["pacs"].domains == ("art_painting", "cartoon", "photo", "sketch")
    assert DATASETS["office_home"].domains == ("Art", "Clipart", "Product", "Real World")
    assert DATASETS["domain_net"].domains == (
        "clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    assert DATASETS["rotated_mnist"].domains == ("0", "15", "30", "45", "60", "75")
    assert DATASETS["pacs"].class_names == (
        "dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    # Upper case sorts first, as in ImageFolder: "TV" before "Table".
    office = DATASETS["office_home"].class_names
    assert office.index("TV") + 1 == office.index("Table")
    assert office[0] == "Alarm_Clock" and office[-1] == "Webcam"


def test_image_folder_is_discovered_at_load_time():
    info = DATASETS["image_folder"]
    assert info.domains == () and info.num_classes is None and info.imagenet


def test_test_groups():
    assert DATASETS["pacs"].test_groups == (
        ("art_painting",), ("cartoon",), ("photo",), ("sketch",))
    assert DATASETS["domain_net"].test_groups == DOMAINNET_GROUPS
    groups = [d for group in DOMAINNET_GROUPS for d in group]
    assert sorted(groups) == sorted(DATASETS["domain_net"].domains)


def test_image_size_and_angles_come_from_defaults():
    assert DATASETS["pacs"].input_shape[:2] == (defaults.IMAGE_SIZE, defaults.IMAGE_SIZE)
    assert DATASETS["rotated_mnist"].domains == tuple(
        str(a) for a in defaults.ROTATED_MNIST_ANGLES)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(DataError, match=r"unknown dataset 'packs'.*'pacs'"):
        get_info("packs")


def test_resolve_names_and_indices():
    names = DATASETS["pacs"].domains
    assert resolve_domains("sketch", names) == ("sketch",)
    assert resolve_domains(0, names) == ("art_painting",)
    assert resolve_domains(["photo", 1], names) == ("photo", "cartoon")
    assert resolve_domains("SKETCH", names) == ("sketch",)
    assert resolve_domains("3", names) == ("sketch",)
    assert resolve_domains((), names) == ()


def test_rotated_mnist_domains_are_named_by_angle():
    names = DATASETS["rotated_mnist"].domains
    assert resolve_domains(["0", "75"], names) == ("0", "75")
    assert resolve_domains("15", names) == ("15",)
    assert resolve_domains(5, names) == ("75",)
    with pytest.raises(DataError, match="index 75 out of range"):
        resolve_domains(75, names)


@pytest.mark.parametrize("bad, message", [
    ("sketches", r"unknown test domain 'sketches'; the domains are \['art_painting'"),
    (4, "test domain index 4 out of range"),
    (-1, "test domain index -1 out of range"),
    (["sketch", 3], r"test domain given twice: \['sketch'\]"),
    (True, "neither a domain name nor an index"),
    (1.5, "unknown test domain 1.5"),
])
def test_resolve_rejects(bad, message):
    with pytest.raises(DataError, match=message):
        resolve_domains(bad, DATASETS["pacs"].domains)


def test_seed_hash_is_domainbeds_md5_hash():
    # DomainBed's misc.seed_hash: md5 of str(args), modulo 2**31.
    for args in [(0, 0), (23, 3), ("augment", 1, 2)]:
        digest = hashlib.md5(str(args).encode("utf-8")).hexdigest()
        assert seed_hash(*args) == int(digest, 16) % 2 ** 31
    assert seed_hash(0, 0) != seed_hash(0, 1)
    assert 0 <= seed_hash(0, 0) < 2 ** 31


def test_data_error_is_a_value_error():
    assert issubclass(registry.DataError, ValueError)
