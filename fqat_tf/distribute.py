"""Helpers for code that runs inside `strategy.run` and outside any strategy alike.

Keras optimizers sum gradients across replicas only inside `apply`; the FQAT step needs some
global values earlier (the perturbation norm, the g_va signs), and updates non-trainable state
(freeze masks, counters) that must stay equal on every replica. These helpers do both the same
way in every context: no strategy, a replica context of MirroredStrategy or
MultiWorkerMirroredStrategy, or cross-replica context.
"""
from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf


def num_replicas() -> int:
    """Replicas taking part in the current step (1 outside a distribution strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(values: Sequence[Optional[tf.Tensor]]) -> list:
    """Sums tensors across replicas inside `strategy.run`; returns them unchanged otherwise.

    Args:
        values: tensors (None entries are passed through).

    Returns:
        A list aligned with `values`.
    """
    values = list(values)
    context = tf.distribute.get_replica_context()
    present = [i for i, v in enumerate(values) if v is not None]
    if num_replicas() == 1 or context is None or not present:
        return values
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in present])
    for i, value in zip(present, reduced):
        values[i] = value
    return values


def replica_update(variables: Sequence, fn: Callable, *args: Sequence) -> None:
    """Runs `fn(variable, *args_i)` on every copy of each variable, from any context.

    Keras variables default to `aggregation="none"`, which forbids a plain `assign` on a mirrored
    variable inside a replica; this goes through the strategy's `update`, as Keras optimizers do.
    Callers pass values that are equal on every replica.

    Args:
        variables: Keras or TF variables.
        fn: called as `fn(tf_variable, *values)`; performs the update.
        *args: sequences aligned with `variables`, one value per variable each.
    """
    variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    per_var = [tuple(a[i] for a in args) for i in range(len(variables))]
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        for var, values in zip(variables, per_var):
            fn(var, *values)
        return

    def merge_fn(distribution, per_var):
        for var, values in zip(variables, per_var):
            distribution.extended.update(var, fn, args=values, group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        merge_fn, tf.distribute.get_strategy(), per_var)


def assign(var, value):
    """`var.assign(value)`, as a `replica_update` function."""
    var.assign(value)


def read_copies(variables: Sequence) -> list:
    """Tensors holding the variables' current values, unchanged by later assignments."""
    # A read tensor keeps its value when the variable is later assigned (copy on write), so it
    # is an exact saved copy.
    return [tf.identity(v.value) if isinstance(v, keras.Variable) else tf.identity(v)
            for v in variables]
