"""The two-pass SAGM gradient of FQAT as a pure function (docs/algorithm.md §2, paper Eq. 3,
App. A).

`sagm_gradients` runs both passes on one batch and returns every gradient a method needs; the
methods in `methods.py` only choose how to combine them. It owns no state: the model's weights
are perturbed and restored inside the call, bit-exactly, and nothing else changes.

Under `tf.distribute` (called inside `strategy.run`) Keras optimizers sum gradients across
replicas only inside `apply`, so the function all-reduces what must be global itself: the first
weight gradient g (the perturbation norm and direction) and g_va (the disorder signs). Every
replica then perturbs identically. The combined gradients it returns are this replica's share,
so the optimizer's own sum gives the global value without a second all-reduce of g.
"""
import dataclasses
from typing import Callable, Sequence

import keras
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.distribute import all_reduce_sum, assign, num_replicas, read_copies, replica_update


@dataclasses.dataclass
class SAGMGradients:
    """Everything one step computes; lists are aligned with the `theta` and `scales` passed in.

    Attributes:
        loss: the first-pass loss, as `loss_fn` returned it (per replica).
        y_pred: the first-pass model output.
        theta_grads: this replica's share of `(g + g_p) / 2` (one pass: of g); None where the
            variable has no gradient.
        scale_grads: this replica's share of `(m * g_va + g_flat) / 2` (one pass: of g_va).
        g_va: the first-pass scale gradients, summed over replicas (zeros where disconnected).
        va_share: this replica's share of g_va.
        flat_share: this replica's share of g_flat (zeros in one-pass mode).
        g_flat: the second-pass scale gradients, summed over replicas (zeros in one-pass mode).
    """
    loss: tf.Tensor
    y_pred: object
    theta_grads: list
    scale_grads: list
    g_va: list
    va_share: list
    flat_share: list
    g_flat: list


def _zeros_like_vars(grads, variables):
    return [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]


def _global_norm(grads) -> tf.Tensor:
    squares = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads if g is not None]
    if not squares:
        return tf.constant(0.0)
    return tf.sqrt(tf.add_n(squares))


def _forward_and_grads(model, x, loss_fn, variables, training):
    with tf.GradientTape() as tape:
        y_pred = model(x, training=training)
        loss = loss_fn(y_pred)
    return loss, y_pred, tape.gradient(loss, list(variables))


def sagm_gradients(model: keras.Model, x, loss_fn: Callable, theta: Sequence,
                   scales: Sequence = (), masks=None, *, rho: float = defaults.RHO,
                   alpha: float = defaults.ALPHA, two_pass: bool = True, training: bool = False,
                   eps: float = defaults.NORM_EPS) -> SAGMGradients:
    """The FQAT two-pass gradient (paper Eq. 3 and Appendix A; docs/algorithm.md §2).

    1. Pass 1 at (theta, s): L1, g = dL1/dtheta, g_va = dL1/ds.
    2. e = (rho / (||g||_2 + eps) - alpha) * g, the norm over all of theta at once;
       theta' = theta + e. The scales are never perturbed.
    3. Pass 2 at (theta', s): g_p = dL2/dtheta', g_flat = dL2/ds.
    4. theta is restored from a saved copy (bit-exact; e is never subtracted).
    5. theta gets (g + g_p) / 2 and each scale s_i gets (m_i * g_va_i + g_flat_i) / 2.

    With rho = alpha = 0 the perturbation is zero and the result reduces to plain QAT:
    theta gets g and (with all masks 1) s gets g_va. With `two_pass=False` only pass 1 runs:
    theta gets g and s gets g_va (ERM / LSQ).

    Args:
        model: a built Keras model, called as `model(x, training=training)`.
        x: the batch inputs.
        loss_fn: `loss_fn(y_pred) -> scalar` (the caller binds targets and sample weights).
        theta: the variables to perturb: every trainable variable that is not a scale.
        scales: the quantizer step variables.
        masks: one 0/1 entry per scale (a sequence or a rank-1 tensor); None means all 1.
        rho: SAM radius.
        alpha: SAGM's gradient-alignment coefficient.
        two_pass: False for the one-pass methods.
        training: passed to both model calls. True runs BN on batch statistics; pass 2 then
            still never changes state (its non-trainable variables are restored).
        eps: keeps the normalisation finite at a zero gradient.

    Returns:
        A `SAGMGradients`.
    """
    theta, scales = list(theta), list(scales)
    n_theta = len(theta)
    replicas = num_replicas()
    loss, y_pred, grads = _forward_and_grads(model, x, loss_fn, theta + scales, training)
    g_local, va_local = grads[:n_theta], _zeros_like_vars(grads[n_theta:], scales)

    if not two_pass:
        g_va = all_reduce_sum(va_local)
        zeros = [tf.zeros_like(v) for v in va_local]
        return SAGMGradients(loss, y_pred, g_local, list(va_local), g_va, list(va_local),
                             zeros, zeros)

    reduced = all_reduce_sum(g_local + va_local)
    g, g_va = reduced[:n_theta], reduced[n_theta:]
    coeff = rho / (_global_norm(g) + eps) - alpha
    saved = read_copies(theta)
    perturbed = [w if gi is None else w + tf.cast(coeff, w.dtype) * gi
                 for w, gi in zip(saved, g)]
    replica_update(theta, assign, perturbed)
    state = list(model.non_trainable_variables) if training else []
    state_saved = read_copies(state)

    _, _, grads_p = _forward_and_grads(model, x, loss_fn, theta + scales, training)
    replica_update(theta + state, assign, saved + state_saved)

    g_p, flat_share = grads_p[:n_theta], _zeros_like_vars(grads_p[n_theta:], scales)
    va_share = [v / replicas for v in g_va] if replicas > 1 else list(g_va)
    g_share = [None if gi is None else (gi / replicas if replicas > 1 else gi) for gi in g]
    theta_grads = []
    for gi, gpi in zip(g_share, g_p):
        if gi is None and gpi is None:
            theta_grads.append(None)
        else:
            gi = tf.zeros_like(gpi) if gi is None else gi
            gpi = tf.zeros_like(gi) if gpi is None else gpi
            theta_grads.append((gi + gpi) * 0.5)
    if masks is None:
        mask_list = [1.0] * len(scales)
    else:
        # One read of the mask variable, not one per scale.
        mask_list = tf.unstack(tf.reshape(tf.convert_to_tensor(masks, tf.float32), [-1]),
                               num=len(scales))
    scale_grads = [(tf.cast(m, va.dtype) * va + fl) * 0.5
                   for m, va, fl in zip(mask_list, va_share, flat_share)]
    return SAGMGradients(loss, y_pred, theta_grads, scale_grads, g_va, va_share, flat_share,
                         all_reduce_sum(flat_share))
