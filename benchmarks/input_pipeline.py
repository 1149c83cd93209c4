"""Throughput of the input pipeline: training images per second per CPU core, before and after.

By default a tree of smooth random JPEGs (256x256, photo-like to compress and decode) is
generated in a temporary folder and read as `image_folder`: 3 training domains and 1 test
domain, as in leave-one-out PACS. Any registered dataset can be measured instead with
`--dataset` and `--data_dir`.

Three training pipelines run in one process, over the same files, in turn (`--rounds` times, so
that load from other jobs falls on all of them alike):

- `before`: the per-image transform as it was: the whole image decoded, cropped, always resized
  with antialiasing, then flip, ColorJitter and grayscale as separate TensorFlow ops;
- `after`: the library's transform (`augment.train_transform_encoded`): the JPEG crop window
  decoded alone, antialiasing only when shrinking, the colour part one XLA function;
- `train_stream`: the whole training stream (`fqat_tf.data.train_stream`), with its per-domain
  order, guard and batching.

Cores are counted two ways: the stream runs on a private tf.data thread pool of `--threads`
threads (default: the CPUs this process may run on, `os.sched_getaffinity`), with intra-op
parallelism 1, and the figure per core is images/s / threads; and images per CPU-second, the
images divided by the CPU time the process used while timing (`resource.getrusage`), which
other jobs on the machine do not inflate.

    python -m benchmarks.input_pipeline                      # generated JPEG tree, 224x224
    python -m benchmarks.input_pipeline --dataset=pacs --data_dir=/data/domainbed
"""
import os
import resource
import tempfile
import time

import tensorflow as tf
from absl import app, flags

from fqat_tf import defaults
from fqat_tf.data import augment, decode, eval_streams, get_info, load_splits, train_stream
from fqat_tf.data.synthetic import write_image_tree

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "image_folder", "Registered dataset to read.")
flags.DEFINE_string("data_dir", None, "Data root; default: a generated JPEG tree.")
flags.DEFINE_integer("image_size", defaults.IMAGE_SIZE, "Side of the images fed to the model.")
flags.DEFINE_integer("batch_per_domain", defaults.BATCH_PER_DOMAIN, "Training images per domain.")
flags.DEFINE_integer("eval_batch_size", defaults.EVAL_BATCH_SIZE, "Evaluation batch size.")
flags.DEFINE_integer("threads", None, "tf.data threads; default: the CPUs this process may use.")
flags.DEFINE_integer("warmup", 5, "Untimed batches before timing.")
flags.DEFINE_integer("batches", 20, "Timed batches per round.")
flags.DEFINE_integer("rounds", 2, "Rounds over the three training pipelines.")
flags.DEFINE_integer("source_size", 256, "Side of the generated JPEGs.")
flags.DEFINE_integer("images_per_class", 40, "Generated images per class and domain.")


def _generated_tree(root: str) -> str:
    classes = [f"class_{k}" for k in range(7)]
    write_image_tree(root, ["d0", "d1", "d2", "d3"], classes,
                     images_per_class=FLAGS.images_per_class,
                     size=(FLAGS.source_size, FLAGS.source_size), formats=("jpg",), smooth=True)
    return root


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(ds: tf.data.Dataset, threads: int):
    """(images/s, images per CPU-second) over `--batches` batches after `--warmup`."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(ds.with_options(options))
    for _ in range(FLAGS.warmup):
        next(iterator)
    count, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    for _ in range(FLAGS.batches):
        count += int(next(iterator)[0].shape[0])
    return count / (time.perf_counter() - start), count / (_cpu_seconds() - cpu)


def _before(encoded, size, seed):
    """The training transform before the fused decode and the XLA colour function."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image = decode.decode(encoded, 3)
    begin, box = augment.crop_box(tf.shape(image), seeds[0])
    x = augment.to_float(tf.slice(image, begin, box))
    x = tf.clip_by_value(tf.image.resize(x, size, antialias=True), 0.0, 1.0)
    x = tf.image.stateless_random_flip_left_right(x, seeds[1])
    x = augment.color_jitter(x, seeds[2])
    grey = tf.random.stateless_uniform([], seeds[3]) < defaults.GRAYSCALE_PROB
    return augment.normalize(tf.where(grey, tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), x))


def _transform_stream(splits, transform, per_batch):
    """The training files in a fixed order through one per-image transform, batched."""
    paths = [p for name in splits.train_domains
             for p in splits.train[name].paths[splits.train[name].indices]]
    size = splits.info.input_shape[:2]

    def load(k, path):
        seed = tf.stack([tf.constant(0, tf.int64), k])
        return transform(tf.io.read_file(path), size, seed), k

    ds = tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(per_batch).prefetch(1)


def run(data_dir: str) -> None:
    kwargs = {"test_domains": "d3"} if FLAGS.dataset == "image_folder" else {}
    if get_info(FLAGS.dataset).imagenet:
        kwargs["image_size"] = FLAGS.image_size
    start = time.perf_counter()
    splits = load_splits(FLAGS.dataset, data_dir, **kwargs)
    n_files = sum(len(s) for part in (splits.train, splits.val, splits.test)
                  for s in part.values())
    threads = FLAGS.threads or len(os.sched_getaffinity(0))
    print(f"dataset {FLAGS.dataset}: {n_files} images, domains {splits.info.domains}, "
          f"load_splits {time.perf_counter() - start:.1f} s")
    print(f"input {splits.info.input_shape}; {threads} tf.data threads (CPUs available "
          f"{len(os.sched_getaffinity(0))}, machine {os.cpu_count()}), load average "
          f"{os.getloadavg()[0]:.1f}")
    per_batch = len(splits.train_domains) * FLAGS.batch_per_domain
    streams = {"train_stream": train_stream(splits, FLAGS.batch_per_domain, seed=0)}
    if all(splits.train[name].paths is not None for name in splits.train_domains):
        streams = {"before": _transform_stream(splits, _before, per_batch),
                   "after": _transform_stream(splits, augment.train_transform_encoded,
                                              per_batch), **streams}
    rates = {name: [] for name in streams}
    for _ in range(FLAGS.rounds):
        for name, ds in streams.items():
            rates[name].append(_measure(ds, threads))
    for name, runs in rates.items():
        wall = max(r[0] for r in runs)
        cpu = max(r[1] for r in runs)
        print(f"train {name:>12}: {wall:6.0f} images/s, {wall / threads:5.0f} per thread, "
              f"{cpu:5.0f} per CPU-second (best of {len(runs)} rounds of "
              f"{FLAGS.batches} x {per_batch})")
    part, name = max(((p, n) for p in ("val", "test") for n in getattr(splits, p)),
                     key=lambda pn: len(getattr(splits, pn[0])[pn[1]]))
    evaluation = eval_streams(splits, FLAGS.eval_batch_size)[part][name].repeat()
    wall, cpu = _measure(evaluation, threads)
    print(f"eval (batch {FLAGS.eval_batch_size}): {wall:.0f} images/s, {cpu:.0f} per "
          f"CPU-second")


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
