"""LSQ / EWGS forward and gradients at boundary points, against hand-computed values."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import defaults, quant_ops
from fqat_tf.quantizers import StepFloor


def _run(fn, x, step, mode, dy):
    def f(x, step):
        with tf.GradientTape() as tape:
            tape.watch([x, step])
            y = fn(x, step)
        return (y,) + tuple(tape.gradient(y, [x, step], output_gradients=dy))

    if mode == "tf_function":
        f = tf.function(f)
    elif mode == "xla":
        f = tf.function(f, jit_compile=True)
    return [t.numpy() for t in f(tf.constant(x, tf.float32), tf.constant(step, tf.float32))]


MODES = ["eager", "tf_function", "xla"]


@pytest.mark.parametrize("mode", MODES)
def test_lsq_signed_2bit_hand_computed(mode):
    # s = 0.5, l = -2, u = 1; points at v/s = l-1, l, l+0.49, -0.5 (tie), 0.49, u, u+1.
    s = 0.5
    x = np.array([-3, -2, -1.51, -0.5, 0.49, 1, 2], np.float32) * s
    dy = np.arange(1, 8, dtype=np.float32)
    y, dx, ds = _run(lambda x, st: quant_ops.lsq_fake_quant(
        x, st, num_bits=2, signed=True, grad_scale=0.5), x, s, mode, dy)
    np.testing.assert_allclose(y, [-1, -1, -1, 0, 0, 0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(dx, [0, 2, 3, 4, 5, 6, 0])
    # sum(dy * [l, 0, -0.49, +0.5 (round half to even gives -0), -0.49, 0, u]) * g
    #   = (-2 + 0 - 1.47 + 2 - 2.45 + 0 + 7) * 0.5
    np.testing.assert_allclose(ds, 3.08 * 0.5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_lsq_unsigned_3bit_hand_computed(mode):
    # s = 0.25, l = 0, u = 7; points at v/s = -1, 0, 0.49, 3.5 (tie), 6.51, 7, 8.
    s = 0.25
    x = np.array([-1, 0, 0.49, 3.5, 6.51, 7, 8], np.float32) * s
    dy = np.arange(1, 8, dtype=np.float32)
    y, dx, ds = _run(lambda x, st: quant_ops.lsq_fake_quant(
        x, st, num_bits=3, signed=False, grad_scale=1.0), x, s, mode, dy)
    np.testing.assert_allclose(y, [0, 0, 0, 1.0, 1.75, 1.75, 1.75], atol=1e-7)
    np.testing.assert_allclose(dx, [0, 2, 3, 4, 5, 6, 0])
    # (0 + 0 - 1.47 + 2 + 2.45 + 0 + 49)
    np.testing.assert_allclose(ds, 51.98, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_ewgs_signed_2bit_hand_computed(mode):
    s, delta = 0.5, 0.3
    x = np.array([-3, -2, -1.51, -0.5, 0.49, 1, 2], np.float32) * s
    dy = np.array([1, 2, 3, -4, 5, -6, 7], np.float32)
    y, dx, ds = _run(lambda x, st: quant_ops.ewgs_fake_quant(
        x, st, num_bits=2, signed=True, grad_scale=1.0, delta=delta), x, s, mode, dy)
    np.testing.assert_allclose(y, [-1, -1, -1, 0, 0, 0.5, 0.5], atol=1e-7)
    # inside: dy * (1 + delta * sign(dy) * (v - round v) / (u - l)), u - l = 3
    expected_dx = [0, 2, 3 * (1 + 0.3 * 0.49 / 3), -4 * (1 - 0.3 * -0.5 / 3),
                   5 * (1 + 0.3 * 0.49 / 3), -6, 0]
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5)
    # step gradient is LSQ's: -2 + 0 - 1.47 - 2 - 2.45 + 0 + 7
    np.testing.assert_allclose(ds, -0.92, rtol=1e-4)


def _reference(x, s, bits, signed, dy, g, delta=None):
    """Independent numpy reference of forward, dx and ds (per channel when s is a vector)."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    v = x / s
    r = np.round(np.clip(v, lo, hi))
    inside = (v >= lo) & (v <= hi)
    scale = 1.0 if delta is None else 1 + delta * np.sign(dy) * (v - r) / (hi - lo)
    dx = dy * inside * scale
    elem = np.where(v < lo, lo, np.where(v > hi, hi, r - v))
    ds = (dy * elem).sum(axis=0 if np.ndim(s) else None) * g
    return r * s, dx, ds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("quantizer", ["lsq", "ewgs"])
def test_against_reference_all_bits(bits, signed, quantizer):
    rng = np.random.default_rng(bits)
    lo, hi = quant_ops.quant_range(bits, signed)
    s = np.float32(0.1)
    # Grid points, half-way points and points outside, plus random values.
    v = np.concatenate([np.arange(lo - 2, hi + 3, 0.5) + 0.01, rng.uniform(lo - 3, hi + 3, 50)])
    x = (v * s).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    g = quant_ops.lsq_grad_scale(x.size, hi)
    kw = dict(num_bits=bits, signed=signed, grad_scale=g)
    fn = (lambda a, b: quant_ops.lsq_fake_quant(a, b, **kw)) if quantizer == "lsq" else (
        lambda a, b: quant_ops.ewgs_fake_quant(a, b, delta=0.2, **kw))
    outs = {m: _run(fn, x, s, m, dy) for m in MODES}
    ref = _reference(x.astype(np.float64), float(s), bits, signed, dy,
                     g, None if quantizer == "lsq" else 0.2)
    for got, want in zip(outs["eager"], ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for m in ("tf_function", "xla"):
        for a, b in zip(outs[m], outs["eager"]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_per_channel(mode):
    rng = np.random.default_rng(0)
    s = np.array([0.05, 0.2, 1.0], np.float32)
    x = rng.normal(size=(3, 3, 4, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, ds = _run(lambda a, b: quant_ops.lsq_fake_quant(
        a, b, num_bits=4, signed=True, grad_scale=1.0), x, s, mode, dy)
    assert ds.shape == (3,)
    for c in range(3):
        ry, rdx, rds = _reference(x[..., c].astype(np.float64), float(s[c]), 4, True,
                                  dy[..., c], 1.0)
        np.testing.assert_allclose(y[..., c], ry, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx[..., c], rdx, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds[c], rds, rtol=1e-4, atol=1e-5)


def test_grad_scale_is_lsq_rule():
    assert quant_ops.lsq_grad_scale(100, 7.0) == pytest.approx(1 / np.sqrt(700))
    np.testing.assert_allclose(quant_ops.lsq_grad_scale(tf.constant(100), 7.0).numpy(),
                               1 / np.sqrt(700), rtol=1e-6)


def test_step_stays_positive_under_huge_negative_update():
    step = keras.Variable(0.1, trainable=True)
    step.constraint = StepFloor()  # as Quantizer.build sets it through add_weight
    opt = keras.optimizers.SGD(learning_rate=1e6)
    x = tf.constant(np.linspace(-5, 5, 101), tf.float32)
    for _ in range(3):
        # A raw update of -1e9: without the constraint the step would be hugely negative.
        opt.apply_gradients([(tf.constant(1e3), step)])
        assert float(step.numpy()) == pytest.approx(defaults.STEP_FLOOR)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quant_ops.lsq_fake_quant(x, step.value, num_bits=4, signed=True, grad_scale=1.0)
    assert np.all(np.isfinite(y.numpy()))
    assert np.all(np.isfinite(tape.gradient(y, x).numpy()))


def test_zero_or_negative_step_is_clamped_in_the_op():
    x = tf.constant([0.5, -0.5, 3.0])
    for s in (0.0, -1.0):
        y = quant_ops.lsq_fake_quant(x, tf.constant(s), num_bits=4, signed=True, grad_scale=1.0)
        assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("bad", [1, 9, 0, 3.5, "4", True])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="num_bits"):
        quant_ops.quant_range(bad, True)


def test_grid_arithmetic_serves_numpy_and_tensors_alike():
    # Ties round to even on both paths; values beyond the range clip to its ends.
    v = np.array([-9.0, -4.5, -0.5, 0.5, 1.5, 2.5, 3.49, 7.0, 12.0], np.float32)
    expected = np.array([-8.0, -4.0, -0.0, 0.0, 2.0, 2.0, 3.0, 7.0, 7.0], np.float32)
    np.testing.assert_array_equal(quant_ops.grid_round(v, -8.0, 7.0), expected)
    np.testing.assert_array_equal(quant_ops.grid_round(tf.constant(v), -8.0, 7.0).numpy(),
                                  expected)
    np.testing.assert_array_equal(quant_ops.grid_quantize(v * 0.25, 0.25, -8.0, 7.0),
                                  expected * 0.25)
    np.testing.assert_array_equal(
        quant_ops.grid_quantize(tf.constant(v * 0.25), 0.25, -8.0, 7.0).numpy(), expected * 0.25)
