"""The global batch as a function of (seed, step): restarts, epochs and sharding over replicas."""
import os

import numpy as np
import pytest
import tensorflow as tf

from fqat_tf.data import DataError, load_splits, order, train_dataset_fn, train_stream
from fqat_tf.data.synthetic import write_image_tree

B = 4
STEPS = 6


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    write_image_tree(root, ["a", "b", "c"], ["x", "y", "z"], images_per_class=3,
                     size=(20, 17), formats=("png", "jpg"))
    # 9 images per domain, 1 held out: 8 training images, an epoch every 2 steps of 4.
    return load_splits("image_folder", root, test_domains="c", image_size=12, seed=0)


@pytest.fixture(scope="module")
def mnist():
    return load_splits("rotated_mnist_5k", test_domains="75", seed=0)


def _batches(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


def _assert_same(batches, expected):
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        for g, w in zip(got, want):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("dataset", ["photos", "mnist"])
@pytest.mark.parametrize("start", [1, 3, 5])
def test_a_restart_at_step_j_gives_the_batches_of_steps_j_on(dataset, start, request):
    splits = request.getfixturevalue(dataset)
    whole = _batches(train_stream(splits, B, seed=3, with_domain=True), STEPS)
    restarted = _batches(train_stream(splits, B, seed=3, with_domain=True, start_step=start),
                         STEPS - start)
    _assert_same(restarted, whole[start:])
    # A different seed gives different batches: the comparison above can fail.
    other = _batches(train_stream(splits, B, seed=4, start_step=start), 1)
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
                             for images, _ in _batches(train_stream(mnist, b, seed=1), steps)])
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


def _take(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("dataset", ["photos", "mnist"])
def test_mirrored_strategy_replicas_get_their_rows(dataset, request):
    splits = request.getfixturevalue(dataset)
    expected = _batches(train_stream(splits, B, seed=5, start_step=2), STEPS)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    dist = strategy.distribute_datasets_from_function(
        train_dataset_fn(splits, B, seed=5, start_step=2))
    got = []
    for images, labels in _take(dist, STEPS):
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
    expected = _batches(train_stream(photos, B, seed=6, start_step=1), STEPS)
    fn = train_dataset_fn(photos, B, seed=6, start_step=1)
    local = replicas // 2
    workers = [_take(fn(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
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
    expected = _take(fn(context[0]), steps)
    backup = {path: open(path, "rb").read() for path in only_1}
    try:
        for path in only_1:
            os.remove(path)
        again = _take(fn(context[0]), steps)
        for got, want in zip(again, expected):
            for g, w in zip(got, want):
                assert np.array_equal(g.numpy(), w.numpy())
        with pytest.raises(tf.errors.InvalidArgumentError, match="cannot read or decode file"):
            _take(fn(context[1]), steps)
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
