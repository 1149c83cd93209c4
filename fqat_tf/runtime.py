"""Process-wide TensorFlow settings that a training process fixes once, at start-up.

TensorFlow takes some settings only before it compiles or executes anything (the graph
optimizer, the collective ops of a multi-worker strategy), and a process should hold one
distribution strategy: a second MirroredStrategy with collective all-reduce in the same process
can fail ("shape mismatch in the collective instance"). This module is the one place that
makes them.
"""
import contextlib
import json
import os
import re

import tensorflow as tf

from fqat_tf.cli import UsageError
from fqat_tf.errors import UserError

STRATEGIES = ("default", "mirrored", "multiworker")
# What srun sets in every task of a Slurm allocation; SlurmClusterResolver reads them.
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")
_strategies = {}
# How TensorFlow names a task in a collective's error ("/job:worker/replica:0/task:1").
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")


class WorkerLost(UserError):
    """A multi-worker run stopped because another worker of its cluster did."""


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


def cluster_resolver():
    """The cluster of a multi-worker run: TF_CONFIG, else the Slurm allocation it runs in.

    Raises:
        UsageError: neither is there, or TF_CONFIG is malformed (named with the reason).
    """
    text = os.environ.get("TF_CONFIG")
    if text is not None:
        _check_tf_config(text)
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if all(k in os.environ for k in SLURM_VARIABLES):
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise UsageError("--strategy=multiworker needs a cluster: set TF_CONFIG on every worker "
                     "(README, Scale) or run inside a Slurm allocation (srun sets "
                     f"{', '.join(SLURM_VARIABLES)})")


def _check_tf_config(text):
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"TF_CONFIG is not valid JSON ({e}): {text[:120]!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and v and all(isinstance(a, str) and ":" in a for a in v)
            for v in cluster.values()):
        raise UsageError(f"TF_CONFIG: 'cluster' must map job names to lists of host:port "
                         f"addresses; got {cluster!r}")
    if not isinstance(task, dict) or task.get("type") not in cluster or \
            not isinstance(task.get("index"), int) or \
            not 0 <= task["index"] < len(cluster[task["type"]]):
        raise UsageError(f"TF_CONFIG: 'task' must name a job of the cluster and an index in "
                         f"it; got {task!r} for jobs "
                         f"{ {k: len(v) for k, v in cluster.items()} }")


def strategy(name="default"):
    """The process's distribution strategy of that name, created on first use.

    Args:
        name: "default" (one device), "mirrored" (every local GPU; without one, every logical
            CPU device, which tests configure) or "multiworker" (MultiWorkerMirroredStrategy
            over `cluster_resolver()`). Create a multi-worker strategy before TensorFlow runs
            any op: its collective ops are configured at program start-up.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _strategies:
        if name == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = gpus or tf.config.list_logical_devices("CPU")
            _strategies[name] = tf.distribute.MirroredStrategy(
                devices=[d.name for d in devices])
        else:
            _strategies[name] = tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=cluster_resolver())
    return _strategies[name]


def is_chief(current=None):
    """Whether this process writes the run's files: always, except a non-chief worker."""
    resolver = getattr(current or tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, index = resolver.task_type, resolver.task_id
    if "chief" in resolver.cluster_spec().as_dict():
        return task_type == "chief"
    return task_type in (None, "worker") and (index or 0) == 0


def worker_index(current=None):
    """This process's index among the workers (0 without a cluster)."""
    resolver = getattr(current or tf.distribute.get_strategy(), "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver is not None else 0


def chief_decides(current, value):
    """The chief's integer `value`, on every worker: a decision all workers must follow.

    A collective in a multi-worker run (every worker calls it, at the same point); elsewhere
    `value` itself.
    """
    if not isinstance(current, tf.distribute.MultiWorkerMirroredStrategy):
        return value

    def chief_only():
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(first, tf.constant(int(value), tf.int64), tf.constant(0, tf.int64))

    total = current.reduce(tf.distribute.ReduceOp.SUM, current.run(chief_only), axis=None)
    return type(value)(int(total.numpy()))


@contextlib.contextmanager
def worker_loss_named(current, run_dir):
    """Turns a collective that fails because another worker stopped into a `WorkerLost`.

    When one worker of a multi-worker run dies, the others fail at their next collective with
    TensorFlow's `UnavailableError` (lost heartbeats, a reset connection) or `AbortedError`.
    That is the expected end of the survivors, not a defect: the message names the stopped
    tasks and what to do. Such an error that names no other task and no collective, and any
    error outside a multi-worker run, passes unchanged.
    """
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as e:
        if not isinstance(current, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        resolver = current.cluster_resolver
        own = (resolver.task_type, str(resolver.task_id))
        others = sorted({m.groups() for m in _TASK.finditer(e.message)} - {own})
        if not others and "Collective" not in e.message:
            raise
        who = ", ".join(f"/job:{job}/task:{index}" for job, index in others) or \
            "another worker"
        raise WorkerLost(
            f"{run_dir}: {who} of the cluster stopped ({type(e).__name__} in a collective); "
            f"restart every worker with the same command: the run resumes from its last "
            f"checkpoint") from None
