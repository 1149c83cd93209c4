"""tf.data streams for training (one batch block per training domain) and evaluation.

Training: every training domain has its own infinite stream, reshuffled every epoch, decoded
and augmented in parallel; the streams are batched per domain, zipped and concatenated, so
each element is `domains x batch_per_domain` images, domain blocks in `splits.train_domains`
order (DomainBed's `zip(*train_loaders)` then concatenation). Every random draw is stateless
and keyed by (seed, domain, epoch or position), so the stream is a function of the seed alone,
independent of TensorFlow's global seed, and `tf.train.Checkpoint(iterator=iter(ds))` saves and
restores its position (no Python callbacks anywhere in the graph). For file and array sources
the checkpoint is symbolic: a few kilobytes of positions, the buffered images being recomputed
on restore.

Sources held as files or arrays are read by position, so each epoch is an exact permutation.
TFDS sources are read in file order and shuffled through a buffer of `TFDS_SHUFFLE_BUFFER`
encoded images; that buffer is part of an iterator checkpoint.
"""
from typing import Dict

import numpy as np
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data import augment as augment_lib
from fqat_tf.data.registry import DataError
from fqat_tf.data.splits import Source, Splits, seed_hash

AUTOTUNE = tf.data.AUTOTUNE


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _positional_loader(source: Source, channels: int):
    """Returns `load(position) -> (uint8 image, label)` for a file or array source, else None."""
    if source.labels is None:
        return None
    labels = tf.constant(source.labels[source.indices], tf.int64)
    if source.paths is not None:
        paths = tf.constant(source.paths[source.indices])
        return lambda i: (_decode(tf.io.read_file(paths[i]), channels), labels[i])
    if source.images is not None:
        images = tf.constant(source.images[source.indices])
        return lambda i: (images[i], labels[i])
    return None


def _tfds_records(source: Source) -> tf.data.Dataset:
    """(encoded image, label) of the members of a TFDS source, in file order."""
    from fqat_tf.data import tfds_builders  # Imports TFDS, which is slow; only here.

    last = int(source.indices.max())
    member = np.zeros(last + 1, bool)
    member[source.indices] = True
    member = tf.constant(member)
    ds = tfds_builders.open_tfds(source).take(last + 1).enumerate()
    return ds.filter(lambda i, record: member[i]).map(lambda i, record: record)


def _options(symbolic_checkpoint: bool = False) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # A symbolic checkpoint saves positions and seeds, not the images in the map and prefetch
    # buffers (hundreds of MB at 224x224); the deterministic pipeline recomputes them on restore.
    # A shuffle buffer (TFDS sources) cannot be recomputed, so it is saved with its contents.
    options.experimental_symbolic_checkpoint = symbolic_checkpoint
    return options


def _domain_train_stream(source, splits, seed, augment_images, batch_per_domain):
    info = splits.info
    size, channels = info.input_shape[:2], info.input_shape[2]
    aug_key = seed_hash("augment", seed, source.domain_index)
    shuffle_key = seed_hash("shuffle", seed, source.domain_index)
    load = _positional_loader(source, channels)
    if load is not None:
        n = len(source)

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), tf.stack([tf.constant(shuffle_key, tf.int64), e]))
            return tf.data.Dataset.from_tensor_slices(order)

        ds, read = tf.data.Dataset.counter().flat_map(epoch), load
    else:
        # A buffer as large as the domain is a full shuffle; larger would only read ahead.
        buffer = min(defaults.TFDS_SHUFFLE_BUFFER, len(source))
        ds = _tfds_records(source).repeat().shuffle(buffer, seed=shuffle_key)

        def read(record):
            return _decode(record[0], channels), record[1]

    def transform(position, record):
        # Reading and decoding happen here, inside the parallel map, not in a serial stage.
        image, label = read(record)
        if not augment_images:
            return augment_lib.eval_transform(image, size, info.imagenet), label
        key = tf.stack([tf.constant(aug_key, tf.int64), position])
        return augment_lib.train_transform(image, size, key, info.imagenet), label

    ds = ds.enumerate().map(transform, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_per_domain, drop_remainder=True)


def train_stream(splits: Splits, batch_per_domain: int = defaults.BATCH_PER_DOMAIN,
                 seed: int = 0, augment: bool = True, with_domain: bool = False
                 ) -> tf.data.Dataset:
    """The infinite training stream: one batch of `domains x batch_per_domain` per element.

    Args:
        splits: from `load_splits`.
        batch_per_domain: images per training domain in each batch.
        seed: the stream seed (order and augmentation); the same seed gives the same stream.
        augment: apply DomainBed's training augmentation (photo datasets only); False feeds the
            evaluation transform.
        with_domain: also yield each image's domain id, its position in `splits.train_domains`.

    Returns:
        A dataset of `(images, labels)` or `(images, labels, domain_ids)`: float32
        (D * B, H, W, C), int64 (D * B,), int32 (D * B,), image i * B + j from domain i.

    Raises:
        DataError: `batch_per_domain` is not a positive int, or exceeds a training domain's size
            (every batch would be dropped).
    """
    if isinstance(batch_per_domain, bool) or not isinstance(batch_per_domain, int) \
            or batch_per_domain < 1:
        raise DataError(f"batch_per_domain={batch_per_domain!r}; expected a positive int")
    streams = []
    for d, name in enumerate(splits.train_domains):
        source = splits.train[name]
        if len(source) < batch_per_domain:
            raise DataError(f"training domain {name!r} has {len(source)} images, fewer than "
                            f"batch_per_domain={batch_per_domain}")
        ds = _domain_train_stream(source, splits, seed, augment, batch_per_domain)
        if with_domain:
            ds = ds.map(lambda x, y, d=d: (x, y, tf.fill(tf.shape(y), tf.constant(d, tf.int32))))
        streams.append(ds)
    ds = tf.data.Dataset.zip(tuple(streams)).map(
        lambda *blocks: tuple(tf.concat(parts, 0) for parts in zip(*blocks)))
    positional = all(splits.train[name].labels is not None for name in splits.train_domains)
    return ds.prefetch(AUTOTUNE).with_options(_options(symbolic_checkpoint=positional))


def eval_stream(source: Source, splits: Splits,
                batch_size: int = defaults.EVAL_BATCH_SIZE) -> tf.data.Dataset:
    """One pass over a source with the evaluation transform: `(images, labels)` batches."""
    info = splits.info
    size, channels = info.input_shape[:2], info.input_shape[2]
    load = _positional_loader(source, channels)
    if load is not None:
        ds = tf.data.Dataset.range(len(source)).map(load, num_parallel_calls=AUTOTUNE)
    else:
        ds = _tfds_records(source).map(lambda encoded, label: (_decode(encoded, channels), label),
                                       num_parallel_calls=AUTOTUNE)
    ds = ds.map(
        lambda image, label: (augment_lib.eval_transform(image, size, info.imagenet), label),
        num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size).prefetch(AUTOTUNE).with_options(_options())
    return ds.apply(tf.data.experimental.assert_cardinality(-(-len(source) // batch_size)))


def eval_streams(splits: Splits, batch_size: int = defaults.EVAL_BATCH_SIZE
                 ) -> Dict[str, Dict[str, tf.data.Dataset]]:
    """Evaluation streams: `{"val": {domain: ds}, "test": {domain: ds}}`.

    "val" holds the hold-out of every training domain (in-distribution), "test" every test
    domain whole (out-of-distribution).

    Raises:
        DataError: `batch_size` is not a positive int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}; expected a positive int")
    return {part: {name: eval_stream(source, splits, batch_size)
                   for name, source in getattr(splits, part).items()}
            for part in ("val", "test")}
