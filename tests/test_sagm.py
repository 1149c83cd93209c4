"""The two-pass gradient against independent references (docs/algorithm.md §2)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import sagm
from helpers import Scale, np_grads, np_sagm, smooth_model, split, toy_quant_model


CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("loss", ["softmax", "quadratic"])
@pytest.mark.parametrize("rho,alpha", [(0.05, 0.001), (0.5, 0.1)])
def test_smooth_model_matches_numpy_sagm(loss, rho, alpha):
    model = smooth_model()
    rng = np.random.RandomState(0)
    x = rng.randn(16, 4).astype("float32")
    if loss == "softmax":
        target = rng.randint(0, 3, 16)
        loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        target = rng.randn(16, 3).astype("float32")
        loss_obj = keras.losses.MeanSquaredError()
    theta, scales = split(model)
    before = [v.numpy().copy() for v in model.weights]
    got = sagm.sagm_gradients(model, x, lambda p: loss_obj(target, p), theta, scales,
                              masks=[1.0], rho=rho, alpha=alpha)
    W, b = (v.numpy().astype(np.float64) for v in theta)
    s = float(scales[0].numpy())
    gW, gb, g_va, g_flat = np_sagm(W, b, s, x.astype(np.float64), target, loss, rho, alpha)
    np.testing.assert_allclose(got.theta_grads[0].numpy(), gW, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.theta_grads[1].numpy(), gb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.g_va[0].numpy(), g_va, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.flat_share[0].numpy(), g_flat, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.scale_grads[0].numpy(), (g_va + g_flat) / 2, rtol=1e-4,
                               atol=1e-6)
    # The perturbation must matter here, or the test above could not tell the passes apart.
    assert not np.allclose(gW, np_grads(W, b, s, x, target, loss)[0], rtol=1e-3)
    for old, new in zip(before, model.weights):
        assert np.array_equal(old, new.numpy()), new.path


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_weights_restored_bit_exactly_and_scales_untouched(mode):
    model = toy_quant_model()
    rng = np.random.RandomState(4)
    # Large, varied weights and a large radius: theta + e - e would differ in the last bits.
    model.set_weights([rng.uniform(0.5, 3.0, w.shape).astype("float32") * 0.3
                       if "step" not in v.path else w
                       for v, w in zip(model.weights, model.get_weights())])
    theta, scales = split(model)
    before = [v.numpy().copy() for v in model.weights]
    x, y = rng.randn(8, 5).astype("float32"), rng.randint(0, 3, 8)

    def run():
        return sagm.sagm_gradients(model, x, lambda p: CE(y, p), theta, scales,
                                   rho=7.0, alpha=0.3).theta_grads

    if mode == "function":
        run = tf.function(run)
    run()
    for old, new in zip(before, model.weights):
        assert np.array_equal(old, new.numpy()), new.path


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_rho_alpha_zero_equals_plain_qat(mode):
    model = toy_quant_model()
    theta, scales = split(model)
    rng = np.random.RandomState(1)
    x = tf.constant(rng.randn(8, 5).astype("float32"))
    y = tf.constant(rng.randint(0, 3, 8))
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def both(rho, alpha):
        two = sagm.sagm_gradients(model, x, lambda p: loss_obj(y, p), theta, scales,
                                  rho=rho, alpha=alpha)
        with tf.GradientTape() as tape:
            plain_loss = loss_obj(y, model(x, training=False))
        plain = tape.gradient(plain_loss, theta + scales)
        return two.theta_grads + two.scale_grads, plain

    if mode != "eager":
        both = tf.function(both, jit_compile=(mode == "xla"))
    two, plain = both(0.0, 0.0)
    for a, b in zip(two, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    assert any(float(tf.reduce_max(tf.abs(p))) > 0 for p in plain[len(theta):])
    two, plain = both(0.5, 0.0)
    assert not all(np.allclose(a.numpy(), b.numpy(), atol=1e-6) for a, b in zip(two, plain))


def test_one_pass_and_masks():
    model = smooth_model()
    theta, scales = split(model)
    rng = np.random.RandomState(2)
    x, y = rng.randn(8, 4).astype("float32"), rng.randint(0, 3, 8)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    one = sagm.sagm_gradients(model, x, lambda p: loss_obj(y, p), theta, scales, two_pass=False)
    W, b = (v.numpy().astype(np.float64) for v in theta)
    gW, gb, g_va = np_grads(W, b, float(scales[0].numpy()), x.astype(np.float64), y, "softmax")
    np.testing.assert_allclose(one.theta_grads[0].numpy(), gW, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one.scale_grads[0].numpy(), g_va, rtol=1e-4, atol=1e-6)
    frozen = sagm.sagm_gradients(model, x, lambda p: loss_obj(y, p), theta, scales,
                                 masks=tf.constant([0.0]))
    np.testing.assert_allclose(frozen.scale_grads[0].numpy(),
                               frozen.flat_share[0].numpy() / 2, rtol=1e-6)


def test_training_pass_two_leaves_state_alone():
    inp = keras.Input((4,))
    h = keras.layers.BatchNormalization(momentum=0.5, name="bn")(keras.layers.Dense(5)(inp))
    model = keras.Model(inp, Scale(name="scale")(h))
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    x = np.random.RandomState(3).randn(8, 4).astype("float32") * 3 + 1
    reference(x, training=True)
    theta, scales = split(model)
    sagm.sagm_gradients(model, x, lambda p: tf.reduce_mean(p ** 2), theta, scales,
                        rho=0.5, alpha=0.0, training=True)
    bn, ref_bn = model.get_layer("bn"), reference.get_layer("bn")
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy())
    np.testing.assert_array_equal(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy())


def test_disconnected_variable_gets_none():
    inp = keras.Input((4,))
    unused = keras.layers.Dense(2, name="unused")
    unused.build((None, 4))
    model = keras.Model(inp, Scale(name="scale")(keras.layers.Dense(3)(inp)))
    theta = [v for v in model.trainable_variables if "step" not in v.path] + unused.weights
    x = np.ones((2, 4), "float32")
    got = sagm.sagm_gradients(model, x, lambda p: tf.reduce_sum(p), theta,
                              [model.get_layer("scale").step])
    assert got.theta_grads[-1] is None and got.theta_grads[0] is not None


def test_real_quantized_model_rho_alpha_zero_and_restore():
    import fqat_tf
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c2")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    model = fqat_tf.quantize_model(keras.Model(inp, out), weight_bits=4, activation_bits=4)
    scales = fqat_tf.scale_variables(model)
    theta = [v for v in model.trainable_variables if all(v is not s for s in scales)]
    rng = np.random.RandomState(6)
    x, y = rng.randn(4, 6, 6, 3).astype("float32"), rng.randint(0, 3, 4)
    before = [v.numpy().copy() for v in model.weights]
    zero = sagm.sagm_gradients(model, x, lambda p: CE(y, p), theta, scales, rho=0.0, alpha=0.0)
    with tf.GradientTape() as tape:
        plain = tape.gradient(CE(y, model(x, training=False)), theta + scales)
    for a, b in zip(zero.theta_grads + zero.scale_grads, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    sagm.sagm_gradients(model, x, lambda p: CE(y, p), theta, scales, rho=5.0, alpha=0.1)
    for old, new in zip(before, model.weights):
        assert np.array_equal(old, new.numpy()), new.path
