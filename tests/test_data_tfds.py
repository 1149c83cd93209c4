"""TFDS: the PACS and Office-Home builders from a manual folder, DomainNet through `domainnet`."""
import os

import numpy as np
import pytest
import tensorflow as tf

from fqat_tf.data import (DATASETS, DOMAINNET_GROUPS, eval_stream, eval_streams, load_splits,
                          train_dataset_fn, train_stream)
from fqat_tf.data.synthetic import write_image_tree

tfds = pytest.importorskip("tensorflow_datasets")
from fqat_tf.data import tfds_builders  # noqa: E402  (registers the builders)


def test_builders_are_registered_with_one_config_per_domain():
    assert {"pacs", "office_home"} <= set(tfds.list_builders())
    assert [c.name for c in tfds_builders.Pacs.BUILDER_CONFIGS] == list(DATASETS["pacs"].domains)
    assert [c.name for c in tfds_builders.OfficeHome.BUILDER_CONFIGS] == [
        "Art", "Clipart", "Product", "Real_World"]
    assert "manual" in tfds_builders.Pacs.MANUAL_DOWNLOAD_INSTRUCTIONS


@pytest.fixture(scope="module")
def pacs_tfds(tmp_path_factory):
    """A tiny PACS tree placed in TFDS's default manual folder of a fresh data_dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    info = DATASETS["pacs"]
    counts = {(d, c): 1 + (i + j) % 2 for i, d in enumerate(info.domains)
              for j, c in enumerate(info.class_names)}
    write_image_tree(os.path.join(data_dir, "downloads", "manual", "PACS"), info.domains,
                     info.class_names, images_per_class=counts, size=(10, 9),
                     formats=("jpg", "png"))
    return data_dir, counts


def test_pacs_builder_prepares_and_loads(pacs_tfds):
    data_dir, counts = pacs_tfds
    builder = tfds.builder("pacs/sketch", data_dir=data_dir)
    builder.download_and_prepare()
    ds = tfds.load("pacs/sketch", split="train", data_dir=data_dir)
    examples = list(tfds.as_numpy(ds))
    per_class = [counts[("sketch", c)] for c in DATASETS["pacs"].class_names]
    assert len(examples) == sum(per_class)
    labels = sorted(int(e["label"]) for e in examples)
    assert labels == sorted(k for k, n in enumerate(per_class) for _ in range(n))
    assert all(e["image"].shape == (10, 9, 3) for e in examples)
    names = {e["filename"].decode() for e in examples}
    assert "sketch/dog/0000.jpg" in names


@pytest.fixture(scope="module")
def pacs_splits(pacs_tfds):
    data_dir, _ = pacs_tfds
    return load_splits("pacs", data_dir, test_domains="photo", source="tfds", image_size=8)


def test_load_splits_through_tfds_matches_the_folder(pacs_tfds, pacs_splits):
    data_dir, _ = pacs_tfds
    via_folder = load_splits("pacs", os.path.join(data_dir, "downloads", "manual"),
                             test_domains="photo", source="folder", image_size=8)
    assert pacs_splits.class_names == via_folder.class_names
    for part in ("train", "val", "test"):
        a, b = getattr(pacs_splits, part), getattr(via_folder, part)
        assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}
        # The hold-out picks the same positions of each domain whichever way it is read.
        for name in a:
            np.testing.assert_array_equal(a[name].indices, b[name].indices)


def test_tfds_streams(pacs_splits):
    images, labels, domains = next(iter(train_stream(pacs_splits, 2, seed=0, with_domain=True)))
    assert images.shape == (6, 8, 8, 3) and domains.numpy().tolist() == [0, 0, 1, 1, 2, 2]
    streams = eval_streams(pacs_splits, batch_size=4)
    for part, sources in (("val", pacs_splits.val), ("test", pacs_splits.test)):
        for name, ds in streams[part].items():
            sizes = [int(tf.size(y)) for _, y in ds]
            assert sum(sizes) == len(sources[name])
            assert len(sizes) == int(ds.cardinality())


def test_tfds_stream_checkpoint(pacs_splits, tmp_path):
    iterator = iter(train_stream(pacs_splits, 2, seed=1))
    next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt"))
    expected = [next(iterator)[0].numpy() for _ in range(3)]
    resumed = iter(train_stream(pacs_splits, 2, seed=1))
    tf.train.Checkpoint(iterator=resumed).restore(path)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)[0].numpy(), want)


def test_office_home_builder_domain_with_a_space(tmp_path):
    info = DATASETS["office_home"]
    manual = tmp_path / "manual"
    write_image_tree(str(manual / "office_home"), ["Real World"], info.class_names,
                     images_per_class=1, size=(6, 6))
    builder = tfds.builder("office_home/Real_World", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    ds = builder.as_dataset(split="train")
    labels = sorted(int(e["label"]) for e in tfds.as_numpy(ds))
    assert labels == list(range(65))
    assert builder.info.features["label"].names == list(info.class_names)


def test_domain_net_through_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        splits = load_splits("domain_net", str(tmp_path), test_domains=DOMAINNET_GROUPS[1],
                             image_size=8, seed=0)
        assert splits.test_domains == ("painting", "quickdraw")
        assert splits.train_domains == ("clipart", "infograph", "real", "sketch")
        assert splits.num_classes == 345
        assert all(s.tfds[1] == "train+test" for s in splits.train.values())
        # The mock serves 12 examples: int(12 * 0.2) = 2 held out per training domain.
        assert [len(splits.val[d]) for d in splits.train_domains] == [2] * 4
        images, labels = next(iter(train_stream(splits, 3, seed=0)))
        assert images.shape == (12, 8, 8, 3)
        assert labels.dtype == tf.int64 and int(tf.reduce_max(labels)) < 345
        x, _ = next(iter(eval_streams(splits, 5)["test"]["painting"]))
        assert x.shape == (5, 8, 8, 3)


def _take(ds, n):
    iterator = iter(ds)
    return [tuple(t.numpy() for t in next(iterator)) for _ in range(n)]


def test_tfds_epochs_are_permutations_and_restarts_replay(pacs_splits):
    source = pacs_splits.train["art_painting"]
    n = len(source)
    members = sorted(x.tobytes() for x, _ in _take(eval_stream(source, pacs_splits, 1), n))
    stream = train_stream(pacs_splits, 1, seed=2, augment=False)
    seen = [images[0].tobytes() for images, _ in _take(stream, 3 * n)]
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == members
    assert seen[:n] != seen[n:2 * n]
    # Starting inside the second epoch reads and drops its first records: the same batches.
    again = [images[0].tobytes() for images, _ in
             _take(train_stream(pacs_splits, 1, seed=2, augment=False, start_step=n + 2), n)]
    assert again == seen[n + 2:2 * n + 2]


def test_tfds_shards_reassemble_into_the_global_batch(pacs_splits):
    expected = _take(train_stream(pacs_splits, 2, seed=4, start_step=1), 3)
    fn = train_dataset_fn(pacs_splits, 2, seed=4, start_step=1)
    workers = [_take(fn(tf.distribute.InputContext(2, w, 2)), 3) for w in range(2)]
    for step, (images, labels) in enumerate(expected):
        # Domain d's block is worker 0's image of domain d, then worker 1's.
        parts = [workers[w][step] for w in range(2)]
        for kind, want in enumerate((images, labels)):
            got = np.concatenate([parts[w][kind][d:d + 1] for d in range(3) for w in range(2)])
            assert np.array_equal(got, want)
