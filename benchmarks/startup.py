"""Start-up cost of a dataset tree: the first `load_splits` (every file checked) and the second
(the manifest vouches for them).

Generates a tree of `--images` small JPEGs (`--domains` domains of `--classes` classes) in a
temporary folder, times `load_splits` twice, prints both and removes the tree. The manifest is
kept in the temporary folder too (`cache_dir`), so nothing is left behind.

    python -m benchmarks.startup                      # 50,000 JPEGs of 32x32
    python -m benchmarks.startup --images=5000 --verify=header
"""
import os
import tempfile
import time

from absl import app, flags

from fqat_tf.data import load_splits
from fqat_tf.data.synthetic import write_image_tree

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 50_000, "Images in the generated tree.")
flags.DEFINE_integer("domains", 4, "Domain folders.")
flags.DEFINE_integer("classes", 10, "Class folders per domain.")
flags.DEFINE_integer("size", 32, "Side of the generated JPEGs.")
flags.DEFINE_enum("verify", "decode", ["header", "decode"], "How far files are checked.")


def _timed_load(root: str, cache_dir: str) -> float:
    start = time.perf_counter()
    load_splits("image_folder", root, test_domains=0, verify=FLAGS.verify, cache_dir=cache_dir)
    return time.perf_counter() - start


def main(argv):
    del argv
    per_class = -(-FLAGS.images // (FLAGS.domains * FLAGS.classes))
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "tree")
        start = time.perf_counter()
        write_image_tree(root, [f"d{k}" for k in range(FLAGS.domains)],
                         [f"c{k}" for k in range(FLAGS.classes)], images_per_class=per_class,
                         size=(FLAGS.size, FLAGS.size), formats=("jpg",))
        n = per_class * FLAGS.domains * FLAGS.classes
        print(f"generated {n} JPEGs of {FLAGS.size}x{FLAGS.size} in "
              f"{time.perf_counter() - start:.0f} s; CPUs {len(os.sched_getaffinity(0))}, load "
              f"average {os.getloadavg()[0]:.1f}")
        cache = os.path.join(tmp, "cache")
        first = _timed_load(root, cache)
        print(f"first load_splits (verify={FLAGS.verify}, every file checked): {first:.2f} s")
        second = _timed_load(root, cache)
        print(f"second load_splits (the manifest vouches for every file): {second:.2f} s")


if __name__ == "__main__":
    app.run(main)
