"""tf.data streams for training (one batch block per training domain) and evaluation.

The global training batch of step n is a pure function of the seed and n (`order`): for every
training domain, in `splits.train_domains` order, the `batch_per_domain` examples at positions
n * B .. n * B + B - 1 of that domain's stream, each augmented with a seed keyed by (seed,
domain, position). DomainBed's `zip(*train_loaders)` then concatenation, with every domain
reshuffled at each of its own epochs. So a stream can start at any step (`start_step`) without
replaying the ones before, and the batch does not depend on the number of devices or workers:

- `train_stream` yields whole global batches (one input pipeline, one replica);
- `train_dataset_fn` gives `strategy.distribute_datasets_from_function` its per-worker datasets.
  With R replicas in sync and b = batch_per_domain / R, replica r receives rows
  [r * b, (r + 1) * b) of every domain's block, concatenated in domain order: reassembling the
  replicas' blocks domain by domain gives back the global batch. A worker's dataset reads and
  decodes only its own replicas' rows, and yields, per step, one element per local replica in
  replica order, which is how the strategy deals a worker's elements to its replicas
  (`distribute_datasets_from_function`: "if a worker has two replicas, two batches will be
  dequeued from the Dataset every step", dealt round-robin by `MultiDeviceIterator`; the tests
  check it under `MirroredStrategy`).

Reading, decoding and augmenting happen in one parallel map per domain; the examples are taken
from the domains in batch order and batched once. A read that fails while training is reported
by file (`reading.guard`). TFDS sources are read in file order: see
`order.windowed_order` for what starting late and sharding cost there.
"""
from typing import Dict, Optional

import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data import augment as augment_lib
from fqat_tf.data import decode as decode_lib
from fqat_tf.data import order, reading
from fqat_tf.data.registry import DataError
from fqat_tf.data.splits import Source, Splits

AUTOTUNE = tf.data.AUTOTUNE


def _options(symbolic_checkpoint: bool = False) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # A symbolic checkpoint saves positions and seeds, not the images in the map and prefetch
    # buffers (hundreds of MB at 224x224); the deterministic pipeline recomputes them on restore.
    options.experimental_symbolic_checkpoint = symbolic_checkpoint
    return options


def _train_image(payload, read, info, seed, augment_images):
    size, channels = info.input_shape[:2], info.input_shape[2]
    if augment_images and info.imagenet and read.encoded:
        return augment_lib.train_transform_encoded(payload, size, seed, channels)
    image = decode_lib.decode(payload, channels) if read.encoded else payload
    if augment_images:
        return augment_lib.train_transform(image, size, seed, info.imagenet)
    return augment_lib.eval_transform(image, size, info.imagenet)


def _domain_examples(source: Source, splits: Splits, batch_per_domain: int, seed: int,
                     start_step: int, augment_images: bool, first_row: int, rows: int,
                     domain_id: Optional[int]):
    """Rows [first_row, first_row + rows) of one domain's block of every step from start_step,
    one example after the other: (image, label) or (image, label, domain_id)."""
    read = reading.reader(source)
    n = len(source)
    key = order.shuffle_key(seed, source.domain_index)
    aug_key = order.augment_key(seed, source.domain_index)
    start = start_step * batch_per_domain
    if read.positional:
        ds = order.positional_order(n, key, start)
    else:
        ds = order.windowed_order(read.records(), n, key, min(defaults.TFDS_SHUFFLE_WINDOW, n),
                                  start)
    if rows < batch_per_domain:
        ds = ds.filter(order.step_rows(batch_per_domain, first_row, rows))
    extra = () if domain_id is None else (tf.constant(domain_id, tf.int32),)

    def transform(position, handle):
        # Reading and decoding happen here, inside the parallel map, not in a serial stage.
        payload, label = read.fetch(handle)
        image = _train_image(payload, read, splits.info, order.position_seed(aug_key, position),
                             augment_images)
        return (image, label, *extra, position)

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    if read.describe is None:
        return ds.map(reading.drop_position)
    describe = ((lambda p: read.describe(order.member_at(n, key, p))) if read.positional
                else read.describe)
    return reading.guard(ds, lambda k: order.row_position(
        batch_per_domain, start_step, first_row, rows, k), describe, read.kind)


def _check_train_args(splits, batch_per_domain, start_step):
    if isinstance(batch_per_domain, bool) or not isinstance(batch_per_domain, int) \
            or batch_per_domain < 1:
        raise DataError(f"batch_per_domain={batch_per_domain!r}; expected a positive int")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise DataError(f"start_step={start_step!r}; expected a non-negative int")
    for name in splits.train_domains:
        if len(splits.train[name]) < batch_per_domain:
            raise DataError(f"training domain {name!r} has {len(splits.train[name])} images, "
                            f"fewer than batch_per_domain={batch_per_domain}")


def _worker_stream(splits, batch_per_domain, seed, augment, start_step, replicas=1,
                   local_replicas=1, first_replica=0, with_domain=False) -> tf.data.Dataset:
    """Per step, one element per local replica: its rows of every domain, in domain order."""
    b = batch_per_domain // replicas
    domains = splits.train_domains
    streams = [_domain_examples(splits.train[name], splits, batch_per_domain, seed, start_step,
                                augment, first_replica * b, local_replicas * b,
                                d if with_domain else None)
               for d, name in enumerate(domains)]
    # Examples are taken from the domains' streams in the order of the elements (replica by
    # replica, domain by domain, b each) and batched once: no second copy to concatenate.
    choice = tf.data.Dataset.from_tensor_slices(tf.constant(
        [d for _ in range(local_replicas) for d in range(len(domains)) for _ in range(b)],
        tf.int64)).repeat()
    ds = tf.data.Dataset.choose_from_datasets(streams, choice)
    ds = ds.batch(len(domains) * b, drop_remainder=True)
    # The guard of file and TFDS reads (`Dataset.ignore_errors`) has no symbolic checkpoint; a
    # run restarts such a stream at its step (`start_step`) rather than from an iterator
    # checkpoint, which would hold the buffered images.
    arrays = all(splits.train[name].images is not None for name in domains)
    return ds.prefetch(AUTOTUNE).with_options(_options(symbolic_checkpoint=arrays))


def train_stream(splits: Splits, batch_per_domain: int = defaults.BATCH_PER_DOMAIN,
                 seed: int = 0, augment: bool = True, with_domain: bool = False,
                 start_step: int = 0) -> tf.data.Dataset:
    """The infinite training stream: element k is the global batch of step start_step + k.

    Args:
        splits: from `load_splits`.
        batch_per_domain: images per training domain in each batch.
        seed: the stream seed (order and augmentation); the same seed gives the same stream.
        augment: apply DomainBed's training augmentation (photo datasets only); False feeds the
            evaluation transform.
        with_domain: also yield each image's domain id, its position in `splits.train_domains`.
        start_step: the step of the first element. File and array sources start anywhere at no
            cost; TFDS sources read (without decoding) the records of the current epoch of each
            domain before the start (`order.windowed_order`).

    Returns:
        A dataset of `(images, labels)` or `(images, labels, domain_ids)`: float32
        (D * B, H, W, C), int64 (D * B,), int32 (D * B,), image i * B + j from domain i.

    Raises:
        DataError: `batch_per_domain` is not a positive int, or exceeds a training domain's size
            (every batch would be dropped), or `start_step` is not a non-negative int.
    """
    _check_train_args(splits, batch_per_domain, start_step)
    return _worker_stream(splits, batch_per_domain, seed, augment, start_step,
                          with_domain=with_domain)


def train_dataset_fn(splits: Splits, batch_per_domain: int = defaults.BATCH_PER_DOMAIN,
                     seed: int = 0, start_step: int = 0, augment: bool = True):
    """The dataset function of the training stream for `distribute_datasets_from_function`.

        dist = strategy.distribute_datasets_from_function(
            train_dataset_fn(splits, 32, seed=0, start_step=step))

    Args:
        splits, batch_per_domain, seed, start_step, augment: as `train_stream`;
            `batch_per_domain` is the global number of images per domain in a step.

    Returns:
        `fn(input_context)`: with R = `input_context.num_replicas_in_sync` replicas over
        `input_context.num_input_pipelines` workers (R / workers each, worker w holding
        replicas w * R / workers onwards), the dataset of worker
        `input_context.input_pipeline_id`: per step, for each of its replicas r in order,
        `(images, labels)` of rows [r * b, (r + 1) * b) of every domain's block, b =
        batch_per_domain / R, concatenated in domain order. A None context means one replica.

    Raises:
        DataError: as `train_stream`; from `fn`, `batch_per_domain` not divisible by R, or R
            not divisible by the number of workers.
    """
    _check_train_args(splits, batch_per_domain, start_step)

    def dataset_fn(input_context: Optional[tf.distribute.InputContext] = None):
        replicas = input_context.num_replicas_in_sync if input_context else 1
        pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline = input_context.input_pipeline_id if input_context else 0
        if batch_per_domain % replicas:
            raise DataError(f"batch_per_domain={batch_per_domain} is not divisible by the "
                            f"{replicas} replicas in sync: every replica takes the same number "
                            f"of images of every domain")
        if replicas % pipelines:
            raise DataError(f"{replicas} replicas in sync cannot be spread evenly over "
                            f"{pipelines} input pipelines")
        local = replicas // pipelines
        return _worker_stream(splits, batch_per_domain, seed, augment, start_step, replicas,
                              local, pipeline * local)

    return dataset_fn


def eval_stream(source: Source, splits: Splits,
                batch_size: int = defaults.EVAL_BATCH_SIZE) -> tf.data.Dataset:
    """One pass over a source with the evaluation transform: `(images, labels)` batches."""
    info = splits.info
    read = reading.reader(source)
    if read.positional:
        ds = tf.data.Dataset.range(len(source)).map(lambda k: (k, k))
    else:
        ds = read.records().enumerate()

    def transform(position, handle):
        payload, label = read.fetch(handle)
        image = decode_lib.decode(payload, info.input_shape[2]) if read.encoded else payload
        return augment_lib.eval_transform(image, info.input_shape[:2], info.imagenet), label, \
            position

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    if read.describe is None:
        ds = ds.map(reading.drop_position)
    else:
        ds = reading.guard(ds, lambda k: k, read.describe, read.kind, end=len(source))
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
