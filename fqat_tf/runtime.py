"""Process-wide TensorFlow settings that a training process fixes once, at start-up.

TensorFlow takes some settings only before it compiles or executes anything (the graph
optimizer, the collective ops of a multi-worker strategy), and a process should hold one
distribution strategy: a second MirroredStrategy with collective all-reduce in the same process
can fail ("shape mismatch in the collective instance"). This module is the one place that
makes them.
"""
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")
_strategies = {}


def enable_determinism():
    """Makes training bit-reproducible: op determinism, and TensorFlow's graph optimizer off.

    Op determinism alone is not enough for the compiled FQAT step: Grappler, TensorFlow's graph
    optimizer, rewrites the step differently from one process to the next and drops orderings
    between its ops, so identical steps from identical state differed in the last bits of the
    weights, within a process and across processes alike (LSQ and FQAT; measured in
    BUILD_NOTES.md, "Determinism"). With Grappler off every repetition was bit-identical. It
    must be called before the train function is compiled.
    """
    tf.config.experimental.enable_op_determinism()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def strategy(name="default"):
    """The process's distribution strategy of that name, created on first use.

    Args:
        name: "default" (one device), "mirrored" (every local GPU, or the logical devices a
            test configured) or "multiworker" (MultiWorkerMirroredStrategy from TF_CONFIG).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _strategies:
        _strategies[name] = (tf.distribute.MirroredStrategy() if name == "mirrored"
                             else tf.distribute.MultiWorkerMirroredStrategy())
    return _strategies[name]
