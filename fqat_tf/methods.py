"""The training methods, found by name in `METHODS` (DomainBed style; ALGORITHM.md §3).

A method says how many passes the step runs, what gradient each scale gets and how masks move.
All of them share `sagm.sagm_gradients`; EWGS variants come from the quantizer choice
(`quantize_model(..., quantizer="ewgs")`), not from a method.
"""
import tensorflow as tf

from fqat_tf import freeze


class Method:
    """Base method; subclasses override only what differs.

    Attributes:
        name: the key in `METHODS`.
        quantized: whether the model must have quantizer scale variables.
        two_pass: whether the step runs the perturbed second pass.
        masked: whether the scale gradient reads the freeze masks.
        hold_frozen: a frozen scale gets no update at all (value and optimizer moments kept).
        mask_rule: `(disorder, r, masks) -> masks` applied every K steps, or None.
    """
    name = ""
    quantized = True
    two_pass = True
    masked = False
    hold_frozen = False
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
    mask_rule = staticmethod(freeze.fqat_rule)


class Alter(Method):
    """Ablation: no freezing; even steps a scale gets g_va, odd steps g_flat."""
    name = "alter"

    def scale_gradients(self, grads, step):
        even = tf.equal(tf.math.floormod(step, 2), 0)
        return [tf.where(even, va, flat) for va, flat in zip(grads.va_share, grads.flat_share)]


class FreezeBoth(Method):
    """Ablation: the FQAT rule, but a frozen scale gets no update at all."""
    name, masked, hold_frozen = "freeze_both", True, True
    mask_rule = staticmethod(freeze.fqat_rule)


class NoUnfreeze(Method):
    """Ablation: the FQAT rule, but once frozen a scale stays frozen to the end."""
    name, masked = "no_unfreeze", True
    mask_rule = staticmethod(freeze.no_unfreeze_rule)


class Reverse(Method):
    """Ablation: freeze g_va where the disorder is above r."""
    name, masked = "reverse", True
    mask_rule = staticmethod(freeze.reverse_rule)


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
