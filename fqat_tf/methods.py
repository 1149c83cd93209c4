"""The training methods, found by name in `METHODS` (DomainBed style; docs/algorithm.md §3).

A method is one entry here that owns everything it changes: how many passes the step runs
(`two_pass`), whether the scales read the freeze masks (`masked`), the rule that moves the masks
(`mask_rule`), the gradient each scale gets (`scale_gradients`) and how the scales are updated
(`update_scales`). All of them share `sagm.sagm_gradients`; EWGS variants come from the
quantizer choice (`quantize_model(..., quantizer="ewgs")`), not from a method. Adding a method
is adding a class here and listing it in `METHODS`.
"""
import keras
import numpy as np
import tensorflow as tf

from fqat_tf import distribute


# Mask rules: (disorders, threshold r, current masks) -> new masks; 1 = g_va flows. They run
# inside the compiled step on tensors, and on numpy arrays in tests and analyses.
def _as_float(flags):
    return tf.cast(flags, tf.float32) if tf.is_tensor(flags) else np.asarray(flags, np.float32)


def _array(values):
    return values if tf.is_tensor(values) else np.asarray(values)


def fqat_rule(disorder, threshold, masks):
    """FQAT (Algorithm 1): freeze g_va where the disorder is below r, unfreeze elsewhere."""
    del masks
    return _as_float(_array(disorder) >= threshold)


def reverse_rule(disorder, threshold, masks):
    """Ablation `reverse`: freeze where the disorder is above r."""
    del masks
    return _as_float(_array(disorder) <= threshold)


def no_unfreeze_rule(disorder, threshold, masks):
    """Ablation `no_unfreeze`: as FQAT, but a frozen scale stays frozen to the end."""
    return _array(masks) * _as_float(_array(disorder) >= threshold)


def aligned_slots(optimizer, variables):
    """Optimizer slot lists aligned one-to-one with `variables` (Adam: momenta, velocities)."""
    slots, seen = [], set()
    for value in vars(optimizer).values():
        if (isinstance(value, (list, tuple)) and len(value) == len(variables) and variables
                and id(value) not in seen
                and all(isinstance(s, keras.Variable) and s is not v
                        and tuple(s.shape) == tuple(v.shape) for s, v in zip(value, variables))):
            seen.add(id(value))
            slots.append(list(value))
    return slots


class Method:
    """Base method; subclasses override only what differs.

    Attributes:
        name: the key in `METHODS`.
        quantized: whether the model must have quantizer scale variables.
        two_pass: whether the step runs the perturbed second pass.
        masked: whether the scale gradient reads the freeze masks.
        mask_rule: `(disorder, r, masks) -> masks` applied every K steps, or None.
    """
    name = ""
    quantized = True
    two_pass = True
    masked = False
    mask_rule = None

    def scale_gradients(self, grads, step):
        """This replica's scale gradients for the optimizer.

        Args:
            grads: the `sagm.SAGMGradients` of the step.
            step: the number of steps applied before this one (int64 tensor).

        Returns:
            A list aligned with the scale variables.
        """
        del step
        return grads.scale_grads

    def update_scales(self, optimizer, scales, scale_grads, masks):
        """Applies the scale gradients (in the compiled step, inside the replica context).

        Args:
            optimizer: the scale optimizer.
            scales: the scale variables.
            scale_grads: `scale_gradients`' result.
            masks: the freeze masks in force (a float tensor, one entry per scale).
        """
        del masks
        optimizer.apply(scale_grads, scales)

    def applied_gradients(self, scale_grads, masks):
        """The gradients that move each scale this step (global, for the gradient log)."""
        del masks
        return scale_grads

    def __repr__(self):
        return f"Method({self.name!r})"


class ERM(Method):
    """Full-precision ERM: one pass, theta gets g."""
    name, quantized, two_pass = "erm", False, False


class SAGM(Method):
    """Full-precision SAGM: theta gets (g + g_p) / 2."""
    name, quantized = "sagm", False


class LSQ(Method):
    """Plain QAT: one pass, theta gets g, every scale g_va."""
    name, two_pass = "lsq", False


class LSQSAGM(Method):
    """SAGM on the quantized model: every scale gets (g_va + g_flat) / 2 (all masks 1)."""
    name = "lsq_sagm"


class FQAT(Method):
    """FQAT: s gets (m * g_va + g_flat) / 2; m = 0 where the g_va disorder is below r."""
    name, masked = "fqat", True
    mask_rule = staticmethod(fqat_rule)


class Alter(Method):
    """Ablation: no freezing; even steps a scale gets g_va, odd steps g_flat."""
    name = "alter"

    def scale_gradients(self, grads, step):
        even = tf.equal(tf.math.floormod(step, 2), 0)
        return [tf.where(even, va, flat) for va, flat in zip(grads.va_share, grads.flat_share)]


class FreezeBoth(Method):
    """Ablation: the FQAT rule, but a frozen scale gets no update at all: its value and its
    optimizer moments are kept (momentum would otherwise still move it)."""
    name, masked = "freeze_both", True
    mask_rule = staticmethod(fqat_rule)

    def update_scales(self, optimizer, scales, scale_grads, masks):
        held = scales + [s for slots in aligned_slots(optimizer, scales) for s in slots]
        before = distribute.read_copies(held)
        optimizer.apply(scale_grads, scales)
        frozen = tf.equal(masks, 0.0)
        keep = [frozen[i % len(scales)] for i in range(len(held))]
        after = distribute.read_copies(held)
        distribute.replica_update(held, lambda v, k, b, a: v.assign(tf.where(k, b, a)),
                                  keep, before, after)

    def applied_gradients(self, scale_grads, masks):
        frozen = tf.equal(masks, 0.0)
        return [tf.where(frozen[i], tf.zeros_like(g), g) for i, g in enumerate(scale_grads)]


class NoUnfreeze(Method):
    """Ablation: the FQAT rule, but once frozen a scale stays frozen to the end."""
    name, masked = "no_unfreeze", True
    mask_rule = staticmethod(no_unfreeze_rule)


class Reverse(Method):
    """Ablation: freeze g_va where the disorder is above r."""
    name, masked = "reverse", True
    mask_rule = staticmethod(reverse_rule)


METHODS = {m.name: m for m in (ERM(), SAGM(), LSQ(), LSQSAGM(), FQAT(), Alter(), FreezeBoth(),
                               NoUnfreeze(), Reverse())}


# Names the training program also accepts: alias -> (method, quantizer it implies).
ALIASES = {"ewgs": ("lsq", "ewgs"), "ewgs_sagm": ("lsq_sagm", "ewgs")}


def resolve(name: str) -> Method:
    """The method `name` or an alias of one (`ALIASES`) names; a clear error otherwise."""
    return get(ALIASES[name][0] if name in ALIASES else name)


def get(name: str) -> Method:
    """The method registered as `name`; a clear error otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]
