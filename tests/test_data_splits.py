"""Hold-out splits (DomainBed's `split_dataset`) and the RotatedMNIST construction."""
import hashlib

import numpy as np
import pytest

from fqat_tf import defaults
from fqat_tf.data import DataError, holdout, load_splits
from fqat_tf.data import rotated_mnist
from fqat_tf.data.synthetic import write_image_tree


def _domainbed_split(n, holdout_fraction, trial_seed, env_i):
    """DomainBed's train.py + misc.split_dataset, transcribed: returns (in, out) keys."""
    seed = int(hashlib.md5(str((trial_seed, env_i)).encode("utf-8")).hexdigest(), 16) % 2 ** 31
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(n * holdout_fraction)
    return sorted(keys[n_out:]), sorted(keys[:n_out])


@pytest.mark.parametrize("n, fraction, seed, env", [
    (100, 0.2, 0, 0), (101, 0.2, 23, 3), (7, 0.2, 1, 2), (834, 0.25, 5, 1), (10, 0.0, 0, 0)])
def test_holdout_matches_domainbed(n, fraction, seed, env):
    kept, held = holdout(n, fraction, seed, env)
    ref_in, ref_out = _domainbed_split(n, fraction, seed, env)
    assert kept.tolist() == ref_in and held.tolist() == ref_out
    assert len(held) == int(n * fraction)


@pytest.fixture(scope="module")
def mnist_splits():
    return load_splits("rotated_mnist_5k", test_domains=["0", "75"], seed=0)


def test_rotated_mnist_5k_split_sizes(mnist_splits):
    s = mnist_splits
    assert s.info.input_shape == (28, 28, 1) and s.num_classes == 10
    assert s.train_domains == ("15", "30", "45", "60") and s.test_domains == ("0", "75")
    # 5000 dealt round-robin to 6 domains: 834, 834, 833, 833, 833, 833.
    sizes = {d: len(s.train[d]) + len(s.val[d]) for d in s.train_domains}
    assert sizes == {"15": 834, "30": 833, "45": 833, "60": 833}
    assert {d: len(s.val[d]) for d in s.train_domains} == {
        "15": 166, "30": 166, "45": 166, "60": 166}
    assert len(s.test["0"]) == 834 and len(s.test["75"]) == 833
    assert set(s.val) == set(s.train_domains)


def test_splits_are_disjoint_and_cover_each_domain(mnist_splits):
    s = mnist_splits
    for d in s.train_domains:
        train, val = set(s.train[d].indices.tolist()), set(s.val[d].indices.tolist())
        assert not train & val
        assert train | val == set(range(len(s.train[d]) + len(s.val[d])))
        assert s.train[d].images is s.val[d].images
    for d in s.test_domains:
        assert s.test[d].indices.tolist() == list(range(len(s.test[d])))


def test_splits_are_reproducible_and_seeded(mnist_splits):
    again = load_splits("rotated_mnist_5k", test_domains=["0", "75"], seed=0)
    other = load_splits("rotated_mnist_5k", test_domains=["0", "75"], seed=23)
    for d in mnist_splits.train_domains:
        assert np.array_equal(again.val[d].indices, mnist_splits.val[d].indices)
        assert np.array_equal(again.train[d].images, mnist_splits.train[d].images)
        assert not np.array_equal(other.val[d].indices, mnist_splits.val[d].indices)


def test_domain_hold_out_does_not_depend_on_the_test_domain(mnist_splits):
    # Domain i's hold-out is keyed by (seed, i) only, as in DomainBed.
    other = load_splits("rotated_mnist_5k", test_domains="30", seed=0)
    assert np.array_equal(other.val["45"].indices, mnist_splits.val["45"].indices)


def test_rotated_mnist_construction_follows_domainbed():
    images, labels = rotated_mnist.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    domains = rotated_mnist.rotated_domains(images, labels)
    order = np.random.RandomState(defaults.ROTATED_MNIST_SHUFFLE_SEED).permutation(5000)
    for i, (angle, (x, y)) in enumerate(zip(defaults.ROTATED_MNIST_ANGLES, domains)):
        dealt = order[i::6]
        assert np.array_equal(y, labels[dealt])
        assert x.shape == (len(dealt), 28, 28, 1) and x.dtype == np.uint8
        if angle == 0:
            assert np.array_equal(x[..., 0], images[dealt])
    # Every image is in exactly one domain.
    assert sum(len(y) for _, y in domains) == 5000


def test_rotation_matches_pil_bilinear():
    pil_image = pytest.importorskip("PIL.Image")
    images, _ = rotated_mnist.load_mnist_5k()
    # Random pixels up to the border exercise PIL's edge handling, which MNIST rarely reaches.
    noise = np.random.RandomState(0).randint(0, 256, size=(20, 28, 28)).astype(np.uint8)
    sample = np.concatenate([images[::50], noise])
    for angle in (15, 45, 75, 33.3):
        ours = rotated_mnist.rotate(sample, angle).astype(int)
        ref = np.stack([np.asarray(pil_image.fromarray(im).rotate(
            angle, resample=pil_image.BILINEAR, fillcolor=0)) for im in sample]).astype(int)
        diff = np.abs(ours - ref)
        # Equal up to float rounding: PIL works in doubles, TensorFlow in float32.
        assert diff.max() <= 1
        assert (diff > 0).mean() < 2e-3


def test_rotation_is_counter_clockwise():
    # A bright pixel right of the centre moves up (to a smaller row) under a 90 degree turn.
    image = np.zeros((1, 9, 9), np.uint8)
    image[0, 4, 7] = 200
    out = rotated_mnist.rotate(image, 90)
    assert out[0, 1, 4] == 200 and out.sum() == 200


def test_rotated_mnist_from_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=60):
        splits = load_splits("rotated_mnist", test_domains=5, seed=0)
    # The mock serves 60 images per split; train + test give 120, 20 per domain.
    assert [len(splits.train[d]) + len(splits.val[d]) for d in splits.train_domains] == [20] * 5
    assert [len(splits.val[d]) for d in splits.train_domains] == [4] * 5
    assert len(splits.test["75"]) == 20
    assert splits.train["0"].images.shape[1:] == (28, 28, 1)


def test_image_size_is_refused_for_mnist():
    with pytest.raises(DataError, match=r"image_size applies to photo datasets"):
        load_splits("rotated_mnist_5k", image_size=32)


def test_tiny_training_domain_keeps_its_image(tmp_path):
    write_image_tree(str(tmp_path), ["a", "b"], ["k"], images_per_class={
        ("a", "k"): 1, ("b", "k"): 3})
    splits = load_splits("image_folder", str(tmp_path), test_domains="b", holdout_fraction=0.5)
    # int(1 * 0.5) = 0 held out: the domain trains on its one image and has no validation part.
    assert len(splits.train["a"]) == 1 and "a" not in splits.val
    splits = load_splits("image_folder", str(tmp_path), test_domains="a", holdout_fraction=0.99)
    assert len(splits.train["b"]) == 1 and len(splits.val["b"]) == 2
