"""Throughput of the input pipeline: images per second of the training and evaluation streams.

By default a tree of smooth random JPEGs (256x256, photo-like to compress and decode) is
generated in a temporary folder and read as `image_folder`: 3 training domains and 1 test
domain, as in leave-one-out PACS. Any registered dataset can be measured instead with
`--dataset` and `--data_dir`. Each stream is first run for `--warmup` batches (tracing, thread
pools, autotuning), then timed over `--batches` batches; the figures are images per second.

    python -m benchmarks.input_pipeline                      # generated JPEG tree, 224x224
    python -m benchmarks.input_pipeline --dataset=pacs --data_dir=/data/domainbed
"""
import os
import tempfile
import time

from absl import app, flags

from fqat_tf import defaults
from fqat_tf.data import eval_streams, get_info, load_splits, train_stream
from fqat_tf.data.synthetic import write_image_tree

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "image_folder", "Registered dataset to read.")
flags.DEFINE_string("data_dir", None, "Data root; default: a generated JPEG tree.")
flags.DEFINE_integer("image_size", defaults.IMAGE_SIZE, "Side of the images fed to the model.")
flags.DEFINE_integer("batch_per_domain", defaults.BATCH_PER_DOMAIN, "Training images per domain.")
flags.DEFINE_integer("eval_batch_size", defaults.EVAL_BATCH_SIZE, "Evaluation batch size.")
flags.DEFINE_integer("warmup", 5, "Untimed batches before timing.")
flags.DEFINE_integer("batches", 30, "Timed batches.")
flags.DEFINE_integer("source_size", 256, "Side of the generated JPEGs.")
flags.DEFINE_integer("images_per_class", 40, "Generated images per class and domain.")


def _generated_tree(root: str) -> str:
    classes = [f"class_{k}" for k in range(7)]
    write_image_tree(root, ["d0", "d1", "d2", "d3"], classes,
                     images_per_class=FLAGS.images_per_class,
                     size=(FLAGS.source_size, FLAGS.source_size), formats=("jpg",), smooth=True)
    return root


def _rate(batches, warmup: int, timed: int):
    """Images per second over `timed` batches after `warmup` untimed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(timed):
        count += int(next(iterator)[0].shape[0])
    return count / (time.perf_counter() - start), count


def _repeat_evaluation(splits):
    """The evaluation stream of the largest split, repeated (full batches of one domain)."""
    part, name = max(((p, n) for p in ("val", "test") for n in getattr(splits, p)),
                     key=lambda pn: len(getattr(splits, pn[0])[pn[1]]))
    return eval_streams(splits, FLAGS.eval_batch_size)[part][name].repeat()


def run(data_dir: str) -> None:
    kwargs = {"test_domains": "d3"} if FLAGS.dataset == "image_folder" else {}
    if get_info(FLAGS.dataset).imagenet:
        kwargs["image_size"] = FLAGS.image_size
    start = time.perf_counter()
    splits = load_splits(FLAGS.dataset, data_dir, **kwargs)
    checked = time.perf_counter() - start
    n_files = sum(len(s) for part in (splits.train, splits.val, splits.test)
                  for s in part.values())
    print(f"dataset {FLAGS.dataset}: {n_files} images, domains {splits.info.domains}, "
          f"load_splits (listing and decoding every file once) {checked:.1f} s")
    print(f"input {splits.info.input_shape}, CPU cores {os.cpu_count()}")

    train = train_stream(splits, FLAGS.batch_per_domain, seed=0)
    rate, count = _rate(train, FLAGS.warmup, FLAGS.batches)
    per_batch = len(splits.train_domains) * FLAGS.batch_per_domain
    print(f"train stream (augmented, {per_batch} images per batch): {rate:.0f} images/s "
          f"({count} images timed)")

    evaluation = _repeat_evaluation(splits)
    rate, count = _rate(evaluation, FLAGS.warmup, FLAGS.batches)
    print(f"eval stream (batch {FLAGS.eval_batch_size}): {rate:.0f} images/s "
          f"({count} images timed)")


def main(argv):
    del argv
    if FLAGS.data_dir is not None or FLAGS.dataset == "rotated_mnist_5k":
        run(FLAGS.data_dir)
        return
    if FLAGS.dataset != "image_folder":
        raise app.UsageError(f"--data_dir is required for --dataset={FLAGS.dataset}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = _generated_tree(tmp)
        print(f"generated {FLAGS.images_per_class * 7 * 4} JPEGs of {FLAGS.source_size}x"
              f"{FLAGS.source_size} in {time.perf_counter() - start:.1f} s")
        run(root)


if __name__ == "__main__":
    app.run(main)
