"""The order of every training domain's stream: a pure function of the seed and the position.

Domain d (n_d training examples) has an infinite stream of positions 0, 1, 2, ...; position p
holds example `perm(d, p // n_d)[p % n_d]`, where `perm(d, e)`, epoch e of domain d, is a
stateless permutation keyed by `(shuffle_key(seed, d), e)`. With B examples per domain in a
batch, step n reads positions n * B .. n * B + B - 1 of every domain. Nothing here depends on
how many steps were taken before, on the number of devices or workers, or on TensorFlow's
global seed, so a stream can start at any step and be split among replicas by rows.

Sources held as files or arrays are read by position (`positional_order`): starting at step n
costs one permutation. TFDS sources can only be read in file order (`windowed_order`): each
epoch permutes consecutive windows of the file order (TFDS shuffles the examples once when it
prepares a dataset), and starting inside an epoch reads and drops the records before the start
position in that epoch (never decoding them).
"""
from typing import Tuple

import tensorflow as tf

from fqat_tf.data.splits import seed_hash


def shuffle_key(seed: int, domain_index: int) -> int:
    """The key of domain `domain_index`'s epoch permutations under `seed`."""
    return seed_hash("shuffle", seed, domain_index)


def augment_key(seed: int, domain_index: int) -> int:
    """The key of the augmentation of domain `domain_index`'s stream positions under `seed`."""
    return seed_hash("augment", seed, domain_index)


def position_seed(key: int, position: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one stream position (int64 [2])."""
    return tf.stack([tf.constant(key, tf.int64), tf.cast(position, tf.int64)])


def permutation(n: int, key: int, epoch: tf.Tensor) -> tf.Tensor:
    """Epoch `epoch` of a domain of `n` examples: a permutation of 0 .. n - 1 (int64 [n])."""
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                    position_seed(key, epoch))


def member_at(n: int, key: int, position: tf.Tensor) -> tf.Tensor:
    """The example (0 .. n - 1) at stream position `position`."""
    position = tf.cast(position, tf.int64)
    return tf.gather(permutation(n, key, position // n), position % n)


def _start(n: int, start: int) -> Tuple[int, int]:
    if start < 0:
        raise ValueError(f"start position {start} is negative")
    return divmod(start, n)


def positional_order(n: int, key: int, start: int = 0) -> tf.data.Dataset:
    """The infinite stream `(position, example)` of a domain of `n` examples from `start` on.

    Starting anywhere costs one permutation: the first epoch is entered at its offset.
    """
    first_epoch, offset = _start(n, start)

    def epoch(e):
        begin = tf.where(tf.equal(e, first_epoch), tf.constant(offset, tf.int64), 0)
        positions = e * n + tf.range(begin, n, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((positions, permutation(n, key, e)[begin:]))

    return tf.data.Dataset.counter(first_epoch, dtype=tf.int64).flat_map(epoch)


def windowed_order(records: tf.data.Dataset, n: int, key: int, window: int, start: int = 0
                   ) -> tf.data.Dataset:
    """The infinite stream `(position, record)` of a domain read in file order.

    Args:
        records: the domain's `n` records in file order (a finite dataset, read once per
            epoch).
        n: the number of records.
        key: the domain's shuffle key.
        window: the records of each window of consecutive records are permuted among
            themselves every epoch, keyed by (key, epoch, window index); at most this many
            records are held at once.
        start: the first position; the records of its epoch before it are read and dropped.
    """
    first_epoch, offset = _start(n, start)

    def permute(index, batch):
        seed = tf.random.experimental.stateless_fold_in(position_seed(key, index[0]), index[1])
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(tf.nest.flatten(batch)[0])[0]), seed)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), batch)

    def epoch(e):
        windows = records.batch(window).enumerate().map(lambda k, b: permute((e, k), b))
        ds = windows.unbatch().enumerate(start=e * n)
        return ds.skip(tf.where(tf.equal(e, first_epoch), tf.constant(offset, tf.int64), 0))

    return tf.data.Dataset.counter(first_epoch, dtype=tf.int64).flat_map(epoch)


def step_rows(batch_per_domain: int, first_row: int, rows: int):
    """A predicate on `(position, ...)`: is the position in rows [first_row, first_row + rows)
    of its step's block of `batch_per_domain` positions?"""
    def keep(position, *unused):
        del unused
        row = position % batch_per_domain
        return tf.logical_and(row >= first_row, row < first_row + rows)
    return keep


def row_position(batch_per_domain: int, start_step: int, first_row: int, rows: int,
                 k: tf.Tensor) -> tf.Tensor:
    """The position of the k-th element of a stream that keeps `rows` rows from `first_row`
    of every step's block, from step `start_step` on."""
    k = tf.cast(k, tf.int64)
    return (start_step + k // rows) * batch_per_domain + first_row + k % rows
