"""FQATModel: updates per method, frozen BN, freeze_both, checkpoints, NaN handling."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

import fqat_tf
from fqat_tf import freeze
from fqat_tf import methods
from fqat_tf.fqat_model import FQATModel
from helpers import np_grads, np_sagm, smooth_model, split, toy_quant_model

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RNG = np.random.RandomState(0)
X, Y = RNG.randn(32, 4).astype("float32"), RNG.randint(0, 3, 32)
XQ = RNG.randn(56, 5).astype("float32")
YQ = RNG.randint(0, 3, 56)


def _wrap(q, method, lr=0.1, scale_lr=0.2, sgd=True, **kwargs):
    quantized = methods.get(method).quantized
    model = FQATModel(q, method, scale_vars=split(q)[1] if quantized else [], **kwargs)
    opt = keras.optimizers.SGD if sgd else keras.optimizers.Adam
    model.compile(optimizer=opt(lr), scale_optimizer=opt(scale_lr) if quantized else None,
                  loss=CE, metrics=["accuracy"])
    return model


def _numpy_params(model):
    theta, scales = split(model.qmodel)
    return [v.numpy().astype(np.float64) for v in theta] + [float(scales[0].numpy())]


@pytest.mark.parametrize("mask", [0.0, 1.0])
def test_scale_update_follows_the_mask(mask):
    model = _wrap(smooth_model(), "fqat", rho=0.3, alpha=0.01)
    model.freeze_state.masks.assign([mask])
    W, b, s = _numpy_params(model)
    x, y = X[:8], Y[:8]
    gW, gb, g_va, g_flat = np_sagm(W, b, s, x.astype(np.float64), y, "softmax", 0.3, 0.01)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    W1, b1, s1 = _numpy_params(model)
    np.testing.assert_allclose(s1, s - 0.2 * (mask * g_va + g_flat) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(W1, W - 0.1 * gW, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b1, b - 0.1 * gb, rtol=1e-5, atol=1e-6)
    assert abs(g_va) > 1e-3 and abs(g_flat) > 1e-3


def test_lsq_and_alter_scale_updates():
    x, y = X[:16], Y[:16]
    lsq = _wrap(smooth_model(), "lsq")
    W, b, s = _numpy_params(lsq)
    _, _, g_va = np_grads(W, b, s, x[:8].astype(np.float64), y[:8], "softmax")
    lsq.fit(x[:8], y[:8], batch_size=8, verbose=0)
    np.testing.assert_allclose(_numpy_params(lsq)[2], s - 0.2 * g_va, rtol=1e-5)

    alter = _wrap(smooth_model(), "alter", rho=0.3, alpha=0.0)
    for step in range(2):  # step 0 (even) takes g_va, step 1 (odd) g_flat
        W, b, s = _numpy_params(alter)
        xb, yb = x[8 * step:8 * step + 8].astype(np.float64), y[8 * step:8 * step + 8]
        _, _, g_va, g_flat = np_sagm(W, b, s, xb, yb, "softmax", 0.3, 0.0)
        alter.fit(xb.astype("float32"), yb, batch_size=8, verbose=0)
        want = s - 0.2 * (g_va if step == 0 else g_flat)
        np.testing.assert_allclose(_numpy_params(alter)[2], want, rtol=1e-5)


@pytest.mark.parametrize("method,moves", [("freeze_both", False), ("fqat", True)])
def test_freeze_both_keeps_frozen_scale_and_moments(method, moves):
    model = _wrap(toy_quant_model(), method, sgd=False, lr=0.01, scale_lr=0.05)
    model.fit(XQ[:24], YQ[:24], batch_size=8, verbose=0, shuffle=False)
    scales = model.scale_variables
    model.freeze_state.masks.assign([0.0, 1.0])
    opt = model.scale_optimizer
    slots = [opt._momentums[0], opt._velocities[0]]
    before = [v.numpy().copy() for v in [scales[0]] + slots]
    other = scales[1].numpy().copy()
    assert np.abs(before[1]).max() > 0
    model.fit(XQ[24:], YQ[24:], batch_size=8, verbose=0, shuffle=False)
    after = [v.numpy() for v in [scales[0]] + slots]
    assert not np.array_equal(other, scales[1].numpy())
    if moves:
        assert not np.array_equal(before[0], after[0])
    else:
        for b, a in zip(before, after):
            np.testing.assert_array_equal(b, a)


def test_bn_frozen_by_default_and_pass_two_never_updates():
    def bn_model():
        keras.utils.set_random_seed(3)
        inp = keras.Input((4,))
        h = keras.layers.BatchNormalization(momentum=0.5, name="bn")(keras.layers.Dense(6)(inp))
        return keras.Model(inp, keras.layers.Dense(3)(h))

    frozen = _wrap(bn_model(), "sagm")
    frozen.fit(X, Y, batch_size=8, verbose=0)
    np.testing.assert_array_equal(frozen.qmodel.get_layer("bn").moving_mean.numpy(), 0.0)
    stats = []
    for method in ("erm", "sagm"):
        model = _wrap(bn_model(), method, rho=0.5, freeze_bn=False)
        model.fit(X[:8], Y[:8], batch_size=8, verbose=0)
        stats.append(model.qmodel.get_layer("bn").moving_mean.numpy())
    assert not np.allclose(stats[0], 0.0)
    np.testing.assert_array_equal(stats[0], stats[1])


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_and_logs(method):
    q = toy_quant_model() if methods.get(method).quantized else smooth_model()
    model = _wrap(q, method, sgd=False, lr=0.01, scale_lr=0.01, freeze_interval=3)
    x, y = (XQ, YQ) if methods.get(method).quantized else (X, Y)
    before = [v.numpy().copy() for v in model.qmodel.trainable_variables]
    history = model.fit(x[:32], y[:32], batch_size=8, epochs=2, verbose=0,
                        callbacks=[freeze.DisorderFreezeCallback(threshold=0.5)])
    assert {"loss", "accuracy", "frozen"} <= set(history.history)
    assert all(np.isfinite(history.history["loss"]))
    assert 0.0 <= history.history["frozen"][-1] <= 1.0
    assert int(model.freeze_state.step.numpy()) == 8
    for old, new in zip(before, model.qmodel.trainable_variables):
        assert not np.array_equal(old, new.numpy()), new.path


def test_xla_step_matches_graph_step():
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(7)
        model = FQATModel(q := toy_quant_model(), "fqat", scale_vars=split(q)[1],
                          freeze_interval=2)
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      scale_optimizer=keras.optimizers.Adam(0.01), loss=CE, jit_compile=jit)
        model.fit(XQ[:32], YQ[:32], batch_size=8, verbose=0, shuffle=False,
                  callbacks=[freeze.DisorderFreezeCallback(threshold=0.6)])
        results.append([v.numpy() for v in model.weights])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def op_determinism():
    tf_config.enable_op_determinism()
    yield
    tf_config.disable_op_determinism()


def _resumable(seed=11):
    keras.utils.set_random_seed(seed)
    q = toy_quant_model()
    model = FQATModel(q, "fqat", scale_vars=split(q)[1], freeze_interval=3)
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  scale_optimizer=keras.optimizers.Adam(0.05), loss=CE)
    return model


def _fit(model, x, y):
    callback = freeze.DisorderFreezeCallback(interval=2, threshold=0.6)
    model.fit(x, y, batch_size=8, verbose=0, shuffle=False, callbacks=[callback])
    return callback.records


@pytest.mark.parametrize("fmt", ["keras", "tf_checkpoint"])
def test_resume_continues_masks_window_and_step(tmp_path, op_determinism, fmt):
    full = _resumable()
    records = _fit(full, XQ, YQ)
    # The run must freeze after the resume point, or the masks would not be exercised.
    assert any(0.0 in r["mask"].values() for r in records if r["step"] > 3)
    first = _resumable()
    _fit(first, XQ[:24], YQ[:24])
    if fmt == "keras":
        first.save_weights(tmp_path / "mid.weights.h5")
    else:
        path = tf.train.Checkpoint(model=first).write(str(tmp_path / "mid"))
    resumed = _resumable(seed=99)  # different init: everything must come from the checkpoint
    if fmt == "keras":
        resumed.load_weights(tmp_path / "mid.weights.h5")
    else:
        tf.train.Checkpoint(model=resumed).read(path).assert_existing_objects_matched()
    assert int(resumed.freeze_state.step.numpy()) == 3
    assert int(resumed.freeze_state.count.numpy()) == 1  # one sign since the last mask update
    assert int(resumed.scale_optimizer.iterations.numpy()) == 3
    _fit(resumed, XQ[24:], YQ[24:])
    for a, b in zip(full.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(full.scale_optimizer.variables, resumed.scale_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_nan_loss_stops_training_and_keeps_checkpoint_finite(tmp_path):
    model = _wrap(toy_quant_model(), "fqat", sgd=False, lr=0.01, scale_lr=0.01)
    x = XQ[:32].copy()
    x[20] = np.nan  # batch 3 of 4
    path = tmp_path / "last.weights.h5"
    saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=1)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient after step 2"):
        model.fit(x, YQ[:32], batch_size=8, verbose=0, shuffle=False, callbacks=[saver])
    in_memory = [v.numpy().copy() for v in model.weights]
    assert all(np.all(np.isfinite(w)) for w in in_memory)
    assert int(model.freeze_state.step.numpy()) == 2
    restored = _wrap(toy_quant_model(), "fqat", sgd=False)
    restored.load_weights(path)
    for a, b in zip(in_memory, restored.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_constructor_and_compile_errors():
    q = toy_quant_model()
    scales = split(q)[1]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        FQATModel(q, "nope", scale_vars=scales)
    with pytest.raises(ValueError, match="full precision"):
        FQATModel(q, "erm", scale_vars=scales)
    with pytest.raises(ValueError, match="has none"):
        FQATModel(smooth_model(), "fqat", scale_vars=[])
    with pytest.raises(ValueError, match="rho"):
        FQATModel(q, "fqat", rho=-1.0, scale_vars=scales)
    stray = keras.Variable(1.0, name="stray")
    with pytest.raises(ValueError, match="not a trainable variable"):
        FQATModel(q, "fqat", scale_vars=[stray])
    model = FQATModel(q, "fqat", scale_vars=scales)
    opt = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="two distinct optimizer"):
        model.compile(optimizer=opt, scale_optimizer=opt, loss=CE)
    float_model = FQATModel(smooth_model(), "sagm")  # scale_vars=None: found by quantize
    with pytest.raises(ValueError, match="has no scale variables"):
        float_model.compile(scale_optimizer=keras.optimizers.Adam(), loss=CE)
    float_model.compile(loss=CE)
    assert float_model.scale_optimizer is None
    model.compile(loss=CE)
    assert model.scale_optimizer.learning_rate.numpy() == pytest.approx(1e-5)
    assert model.scale_optimizer.weight_decay is None
    assert model.optimizer.weight_decay == pytest.approx(1e-4)


def test_real_quantized_model_end_to_end():
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    qmodel = fqat_tf.quantize_model(keras.Model(inp, out), weight_bits=4, activation_bits=4,
                                    per_channel=True)
    model = FQATModel(qmodel, "fqat", freeze_interval=2)
    scales = fqat_tf.scale_variables(qmodel)
    assert [id(v) for v in model.scale_variables] == [id(v) for v in scales]
    assert [tuple(f.shape) for f in model.freeze_state.flips] == [tuple(s.shape) for s in scales]
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  scale_optimizer=keras.optimizers.Adam(1e-3), loss=CE)
    x = RNG.randn(16, 8, 8, 3).astype("float32")
    before = [s.numpy().copy() for s in scales]
    callback = freeze.DisorderFreezeCallback(threshold=0.5)
    model.fit(x, RNG.randint(0, 3, 16), batch_size=4, verbose=0, callbacks=[callback])
    assert len(callback.records) == 2
    assert any(not np.array_equal(b, s.numpy()) for b, s in zip(before, scales))
