"""Training and evaluation streams: batch composition, epochs, seeds, restarts, sharding over
replicas, checkpoints, shapes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data import (DataError, eval_stream, eval_streams, load_splits, order,
                          train_dataset_fn, train_stream)
from fqat_tf.data.synthetic import write_image_tree

B = 4       # images per domain in the restart and sharding tests
STEPS = 6
MEAN = np.array(defaults.IMAGENET_MEAN, np.float32)
STD = np.array(defaults.IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def mnist():
    return load_splits("rotated_mnist_5k", test_domains="75", seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    write_image_tree(root, ["a", "b", "c"], ["x", "y", "z"], images_per_class=3,
                     size=(14, 11), formats=("png", "jpg"))
    # 9 images per domain, 1 held out: 8 training images, an epoch every 2 steps of 4.
    return load_splits("image_folder", root, test_domains="c", image_size=12, seed=0)


def _keys(images):
    """One key per image; float images in [0, 1] are keyed by their 8-bit levels."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round(images * 255.0).astype(np.uint8)
    return [im.tobytes() for im in images]


def _split_keys(source):
    return set(_keys(source.images[source.indices]))


def _take(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


def test_batch_composition_and_domain_ids(mnist):
    b = 8
    batches = _take(train_stream(mnist, b, seed=0, with_domain=True), 3)
    train_keys = {d: _split_keys(mnist.train[d]) for d in mnist.train_domains}
    held_keys = set().union(*(_split_keys(mnist.val[d]) for d in mnist.train_domains),
                            _split_keys(mnist.test["75"]))
    for images, labels, domains in batches:
        assert images.shape == (5 * b, 28, 28, 1) and images.dtype == np.float32
        assert labels.dtype == np.int64 and domains.dtype == np.int32
        assert domains.tolist() == [d for d in range(5) for _ in range(b)]
        for d, name in enumerate(mnist.train_domains):
            block = _keys(images[d * b:(d + 1) * b])
            # Block d holds training images of domain d only: no validation or test image.
            assert set(block) <= train_keys[name]
            assert not set(block) & held_keys


def test_labels_belong_to_their_images(mnist):
    source = mnist.train["30"]
    lookup = dict(zip(_keys(source.images[source.indices]), source.split_labels().tolist()))
    images, labels = _take(train_stream(mnist, 16, seed=3), 1)[0]
    block = slice(2 * 16, 3 * 16)
    assert [lookup[k] for k in _keys(images[block])] == labels[block].tolist()


def test_each_epoch_is_a_permutation(mnist):
    b, n = 16, len(mnist.train["0"])
    steps = n // b
    batches = _take(train_stream(mnist, b, seed=1), 2 * steps + 2)
    first = [k for images, _ in batches[:steps] for k in _keys(images[:b])]
    assert len(set(first)) == steps * b
    # The stream carries on across epochs: the n - steps * b leftovers come next, then epoch 2
    # starts, in a new order.
    stream = [k for images, _ in batches for k in _keys(images[:b])]
    assert set(stream[:n]) == _split_keys(mnist.train["0"])
    assert stream[n:2 * n - 16] != stream[:n - 16]


def test_same_seed_same_stream_whatever_the_global_seed(photos):
    tf.random.set_seed(1)
    first = _take(train_stream(photos, 4, seed=5), 3)
    tf.random.set_seed(99)
    again = _take(train_stream(photos, 4, seed=5), 3)
    other = _take(train_stream(photos, 4, seed=6), 3)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not all(np.array_equal(x1, x3) for (x1, _), (x3, _) in zip(first, other))


@pytest.mark.parametrize("dataset", ["photos", "mnist"])
def test_checkpointed_iterator_resumes_at_the_same_position(dataset, request, tmp_path):
    splits = request.getfixturevalue(dataset)
    iterator = iter(train_stream(splits, 4, seed=2))
    for _ in range(3):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt"))
    if dataset == "mnist":
        # Arrays checkpoint symbolically: positions only, no buffered images (a batch alone is
        # 5 x 4 x 28 x 28 floats). Streams of files save their buffers too (the guard of their
        # reads has no symbolic checkpoint); a run restarts them with start_step instead.
        assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 20_000
    expected = [tuple(t.numpy() for t in next(iterator)) for _ in range(4)]
    # A resumed run builds its stream afresh and restores the position into it.
    resumed = iter(train_stream(splits, 4, seed=2))
    tf.train.Checkpoint(iterator=resumed).restore(path).assert_consumed()
    for want in expected:
        got = next(resumed)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g.numpy())


def test_augmented_photo_batches(photos):
    images, labels = _take(train_stream(photos, 5, seed=0), 1)[0]
    assert images.shape == (2 * 5, 12, 12, 3) and images.dtype == np.float32
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert np.all(images >= low - 1e-5) and np.all(images <= high + 1e-5)
    assert set(labels.tolist()) <= {0, 1, 2}


def test_unaugmented_stream_uses_the_evaluation_transform(photos):
    images, labels = _take(train_stream(photos, 7, seed=0, augment=False), 1)[0]
    evaluated = {}
    for name in photos.train_domains:
        for x, y in eval_stream(photos.train[name], photos, batch_size=100):
            evaluated.update({v.tobytes(): int(label) for v, label in zip(x.numpy(), y.numpy())})
    # Every image is exactly an evaluation-transformed training image, with its label.
    assert [evaluated[x.tobytes()] for x in images] == labels.tolist()


def test_eval_streams_cover_each_split_once_in_order(mnist):
    streams = eval_streams(mnist, batch_size=64)
    assert set(streams) == {"val", "test"}
    assert list(streams["val"]) == list(mnist.train_domains)
    assert list(streams["test"]) == ["75"]
    for part, sources in (("val", mnist.val), ("test", mnist.test)):
        for name, ds in streams[part].items():
            source = sources[name]
            batches = [(x.numpy(), y.numpy()) for x, y in ds]
            assert [len(y) for _, y in batches][:-1] == [64] * (len(batches) - 1)
            assert int(ds.cardinality()) == len(batches) == -(-len(source) // 64)
            images = np.concatenate([x for x, _ in batches])
            labels = np.concatenate([y for _, y in batches])
            np.testing.assert_allclose(images, source.images[source.indices] / 255.0, atol=1e-6)
            np.testing.assert_array_equal(labels, source.split_labels())


def test_photo_eval_stream_shapes(photos):
    streams = eval_streams(photos, batch_size=4)
    x, y = next(iter(streams["test"]["c"]))
    assert x.shape == (4, 12, 12, 3) and y.dtype == tf.int64
    assert sum(int(tf.size(y)) for _, y in streams["test"]["c"]) == 9


def test_bad_batch_sizes(mnist):
    with pytest.raises(DataError, match="batch_per_domain=0"):
        train_stream(mnist, 0)
    with pytest.raises(DataError, match=r"training domain '0' has 668 images, fewer than "
                                        r"batch_per_domain=1000"):
        train_stream(mnist, 1000)
    with pytest.raises(DataError, match="batch_size=-3"):
        eval_streams(mnist, batch_size=-3)


def _assert_same(batches, expected):
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        for g, w in zip(got, want):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("dataset", ["photos", "mnist"])
@pytest.mark.parametrize("start", [1, 3, 5])
def test_a_restart_at_step_j_gives_the_batches_of_steps_j_on(dataset, start, request):
    splits = request.getfixturevalue(dataset)
    whole = _take(train_stream(splits, B, seed=3, with_domain=True), STEPS)
    restarted = _take(train_stream(splits, B, seed=3, with_domain=True, start_step=start),
                         STEPS - start)
    _assert_same(restarted, whole[start:])
    # A different seed gives different batches: the comparison above can fail.
    other = _take(train_stream(splits, B, seed=4, start_step=start), 1)
    assert not np.array_equal(other[0][0], whole[start][0])


def test_positions_follow_the_epoch_permutations(mnist):
    """Position p of domain d is example perm(d, p // n)[p % n]; every epoch a permutation."""
    b, name = 16, "30"
    source = mnist.train[name]
    n = len(source)
    pixels = source.images[source.indices]
    steps = 2 * n // b + 3
    d = mnist.train_domains.index(name)
    stream = np.concatenate([images[d * b:(d + 1) * b]
                             for images, _ in _take(train_stream(mnist, b, seed=1), steps)])
    # Every position's image is one of the domain's images (its 8-bit levels): find which.
    lookup = {im.tobytes(): i for i, im in enumerate(pixels)}
    assert len(lookup) == n
    members = np.array([lookup[np.round(im * 255.0).astype(np.uint8).tobytes()]
                        for im in stream])
    key = order.shuffle_key(1, source.domain_index)
    for e in range(2):
        epoch = members[e * n:(e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))
        np.testing.assert_array_equal(epoch, order.permutation(n, key, e).numpy())
    assert not np.array_equal(members[:n], members[n:2 * n])


def _reassemble(parts, b):
    """The global batch from the replicas' parts, in replica order: block d of the global batch
    is the replicas' rows of domain d, one after the other."""
    domains = parts[0][0].shape[0] // b
    return tuple(np.concatenate([part[kind][d * b:(d + 1) * b] for d in range(domains)
                                 for part in parts])
                 for kind in range(2))


def _next(dataset, n):
    """The first n elements of any iterable dataset (distributed ones have no `take`)."""
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("dataset", ["photos", "mnist"])
def test_mirrored_strategy_replicas_get_their_rows(dataset, request):
    splits = request.getfixturevalue(dataset)
    expected = _take(train_stream(splits, B, seed=5, start_step=2), STEPS)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    dist = strategy.distribute_datasets_from_function(
        train_dataset_fn(splits, B, seed=5, start_step=2))
    got = []
    for images, labels in _next(dist, STEPS):
        parts = [(x.numpy(), y.numpy()) for x, y in zip(
            strategy.experimental_local_results(images),
            strategy.experimental_local_results(labels))]
        # Replica r holds B / 2 images of every domain.
        assert [x.shape[0] for x, _ in parts] == [len(splits.train_domains) * B // 2] * 2
        got.append(_reassemble(parts, B // 2))
    _assert_same(got, [batch[:2] for batch in expected])


@pytest.mark.parametrize("replicas", [2, 4])
def test_input_pipelines_each_give_their_replicas_rows(photos, replicas):
    """Two workers; with 4 replicas each worker yields its 2 replicas' parts in turn."""
    expected = _take(train_stream(photos, B, seed=6, start_step=1), STEPS)
    fn = train_dataset_fn(photos, B, seed=6, start_step=1)
    local = replicas // 2
    workers = [_next(fn(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
                                                   num_replicas_in_sync=replicas)),
                     STEPS * local)
               for w in range(2)]
    got = []
    for step in range(STEPS):
        parts = [tuple(t.numpy() for t in workers[w][step * local + r])
                 for w in range(2) for r in range(local)]
        got.append(_reassemble(parts, B // replicas))
    _assert_same(got, [batch[:2] for batch in expected])


def test_a_worker_reads_only_its_own_rows(photos, tmp_path):
    """Worker 0 streams on with every file deleted that only worker 1 reads in those steps."""
    steps = 3
    fn = train_dataset_fn(photos, B, seed=7)
    context = [tf.distribute.InputContext(2, w, 2) for w in range(2)]
    files = {0: set(), 1: set()}
    for name in photos.train_domains:
        source = photos.train[name]
        key = order.shuffle_key(7, source.domain_index)
        for p in range(steps * B):
            member = int(order.member_at(len(source), key, p))
            files[(p % B) // (B // 2)].add(source.paths[source.indices][member])
    only_1 = files[1] - files[0]
    assert only_1
    expected = _next(fn(context[0]), steps)
    backup = {path: open(path, "rb").read() for path in only_1}
    try:
        for path in only_1:
            os.remove(path)
        again = _next(fn(context[0]), steps)
        for got, want in zip(again, expected):
            for g, w in zip(got, want):
                assert np.array_equal(g.numpy(), w.numpy())
        with pytest.raises(tf.errors.InvalidArgumentError, match="cannot read or decode file"):
            _next(fn(context[1]), steps)
    finally:
        for path, data in backup.items():
            with open(path, "wb") as f:
                f.write(data)


def test_replica_and_step_arguments_are_checked(photos):
    fn = train_dataset_fn(photos, 3, seed=0)
    with pytest.raises(DataError, match=r"batch_per_domain=3 is not divisible by the 2 "
                                        r"replicas in sync"):
        fn(tf.distribute.InputContext(1, 0, 2))
    with pytest.raises(DataError, match="3 replicas in sync cannot be spread evenly over 2"):
        train_dataset_fn(photos, 6)(tf.distribute.InputContext(2, 0, 3))
    with pytest.raises(DataError, match="start_step=-1"):
        train_stream(photos, B, start_step=-1)
    with pytest.raises(DataError, match="start_step=1.5"):
        train_dataset_fn(photos, B, start_step=1.5)
