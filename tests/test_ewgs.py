"""EWGS's Hessian-based delta refresh."""
import keras
import numpy as np
import tensorflow as tf

import fqat_tf
from fqat_tf import ewgs


def _model():
    x = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="hidden")(x)
    h = keras.layers.Dense(4, activation="relu", name="mid")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return fqat_tf.quantize_model(keras.Model(x, out), weight_bits=4, activation_bits=8,
                                  quantizer="ewgs")


def test_delta_matches_exact_hessian_trace():
    qmodel = _model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    deltas = ewgs.refresh_ewgs_deltas(qmodel, x, y, num_samples=400, seed=0)
    assert set(deltas) == {"hidden", "mid"}  # the classifier is float
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for name in ("hidden", "mid"):
        kernel = qmodel.get_layer(name).layer.kernel
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = ce(y, qmodel(x, training=False))
            g = inner.gradient(loss, kernel)
        hessian = outer.jacobian(g, kernel).numpy().reshape(kernel.shape.num_elements(), -1)
        exact = max(np.trace(hessian) / g.shape.num_elements() / (3 * np.std(g.numpy())), 0.0)
        assert deltas[name] == qmodel.get_layer(name).weight_variables["delta"].numpy()
        np.testing.assert_allclose(deltas[name], exact, rtol=0.25, atol=1e-4)
    # Activation quantizers keep their fixed delta.
    assert qmodel.get_layer("mid").input_variables["delta"].numpy() == np.float32(1e-3)


def test_callback_refreshes_at_start_and_every_interval():
    qmodel = _model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = rng.integers(0, 3, 8)
    cb = ewgs.EWGSDeltaCallback((x, y), interval=2)
    qmodel.compile(optimizer="adam",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert all(set(h["delta"]) == {"hidden", "mid"} for h in cb.history)


def test_hutchinson_trace_of_quadratic():
    # L = 0.5 * w^T diag(a) w has Tr(H) = sum(a); Rademacher probes are exact for diagonal H.
    a = tf.constant([1.0, 2.0, 3.0, 4.0])
    w = tf.Variable([0.3, -0.2, 0.1, 0.5])
    (trace,) = ewgs.hutchinson_trace(lambda: 0.5 * tf.reduce_sum(a * w * w), [w],
                                          num_samples=2, seed=0)
    np.testing.assert_allclose(trace.numpy(), 10.0, rtol=1e-6)
    delta = ewgs.ewgs_delta_from_hessian(trace, 4, tf.constant([1.0, -1.0, 1.0, -1.0]))
    np.testing.assert_allclose(delta.numpy(), 10.0 / 4 / (3 * 1.0), rtol=1e-5)
    assert ewgs.ewgs_delta_from_hessian(-1.0, 4, tf.constant([1.0, -1.0])).numpy() == 0.0
