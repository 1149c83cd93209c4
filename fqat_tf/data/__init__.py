"""The DomainBed data layer: datasets, leave-domains-out splits, input streams, evaluation.

    splits = load_splits("pacs", "/data/domainbed", test_domains="sketch", seed=0)
    batches = train_stream(splits, batch_per_domain=32, seed=0)      # infinite, 3 x 32 per batch
    dist = strategy.distribute_datasets_from_function(                # the same batches, sharded
        train_dataset_fn(splits, batch_per_domain=32, seed=0, start_step=step))
    results = evaluate(model, eval_streams(splits, batch_size=64))   # val/<d>, test/<d>, *_avg
    best = select_best(records)                                      # by training-domain val

`rotated_mnist_5k` runs with no network and no data folder. The TFDS builders for PACS and
Office-Home are registered by `import fqat_tf.data.tfds_builders` (kept out of this import
because TFDS is slow to import).
"""
from fqat_tf.data.augment import eval_transform, train_transform
from fqat_tf.data.evaluation import evaluate, select_best
from fqat_tf.data.pipeline import eval_stream, eval_streams, train_dataset_fn, train_stream
from fqat_tf.data.reading import explain_input_error
from fqat_tf.data.registry import (DATASETS, DOMAINNET_GROUPS, DataError, DatasetInfo,
                                   get_info, resolve_domains)
from fqat_tf.data.splits import Source, Splits, holdout, load_splits, seed_hash

__all__ = [
    "DATASETS", "DOMAINNET_GROUPS", "DataError", "DatasetInfo", "Source", "Splits",
    "eval_stream", "eval_streams", "eval_transform", "evaluate", "explain_input_error",
    "get_info", "holdout", "load_splits", "resolve_domains", "seed_hash", "select_best",
    "train_dataset_fn", "train_stream", "train_transform",
]
