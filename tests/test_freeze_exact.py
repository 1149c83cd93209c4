"""Freeze decisions fall at steps K, 2K, ... whatever the execution: steps_per_execution 1, 2
and 3, XLA, and a resume mid-window (docs/algorithm.md §3)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import freeze, methods
from fqat_tf.fqat_model import FQATModel
from helpers import split, toy_quant_model

K, STEPS, THRESHOLD = 3, 12, 0.4
RNG = np.random.RandomState(11)
X, Y = RNG.randn(8 * STEPS, 5).astype("float32"), RNG.randint(0, 3, 8 * STEPS)


def _model(steps_per_execution=1, jit_compile=False):
    keras.utils.set_random_seed(7)
    q = toy_quant_model()
    model = FQATModel(q, "fqat", rho=0.2, alpha=0.01, scale_vars=split(q)[1], freeze_interval=K,
                      track_scale_gradients=True)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  scale_optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    return model


class _Recorder(keras.callbacks.Callback):
    """After every execution: the step counter, the masks in force and the summed g_va."""

    def __init__(self):
        super().__init__()
        self.steps, self.masks, self.g_va = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        state = self.model.freeze_state
        self.steps.append(int(state.step.numpy()))
        self.masks.append(state.masks.numpy().copy())
        self.g_va.append(self.model.scale_gradient_sums.numpy()[0].copy())
        self.model.scale_gradient_sums.assign(np.zeros_like(self.model.scale_gradient_sums))


def _train(model, x=X, y=Y):
    recorder = _Recorder()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[freeze.DisorderFreezeCallback(threshold=THRESHOLD), recorder])
    return recorder


def _reference_masks(g_va):
    """The masks in force after every step, from the per-step g_va, by the numpy rule."""
    masks, history, window = np.ones(g_va.shape[1], np.float32), [], []
    for g in g_va:
        window.append(np.sign(g))
        if len(window) == K:
            disorder = np.array([freeze.gradient_disorder(np.array(window)[:, i])
                                 for i in range(g_va.shape[1])])
            masks = methods.fqat_rule(disorder, THRESHOLD, masks)
            window = []
        history.append(masks.copy())
    return np.array(history)


@pytest.fixture(scope="module")
def one_step():
    model = _model()
    recorder = _train(model)
    return model, recorder


def test_decisions_every_k_steps_equal_the_numpy_reference(one_step):
    model, recorder = one_step
    assert recorder.steps == list(range(1, STEPS + 1))
    reference = _reference_masks(np.array(recorder.g_va))
    np.testing.assert_array_equal(np.array(recorder.masks), reference)
    # The window is exercised: some scale froze and some decision changed a mask.
    assert (reference == 0).any() and len({tuple(m) for m in reference}) > 1
    assert int(model.freeze_state.decisions.numpy()) == STEPS // K
    assert int(model.freeze_state.decision_step.numpy()) == STEPS


@pytest.mark.parametrize("steps_per_execution,jit_compile", [(2, False), (3, False), (1, True),
                                                              (2, True)])
def test_any_execution_takes_the_same_decisions(one_step, steps_per_execution, jit_compile):
    model, recorder = one_step
    other = _model(steps_per_execution, jit_compile)
    seen = _train(other)
    assert seen.steps == list(range(steps_per_execution, STEPS + 1, steps_per_execution))
    for step, masks in zip(seen.steps, seen.masks):
        np.testing.assert_array_equal(masks, recorder.masks[step - 1], err_msg=str(step))
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_resume_mid_window_continues_exactly(one_step, tmp_path):
    model, _ = one_step
    first = _model()
    _train(first, X[:8 * 4], Y[:8 * 4])              # a window of K = 3 holds one sign
    assert int(first.freeze_state.count.numpy()) == 1
    ckpt = tf.train.Checkpoint(model=first, optimizer=first.optimizer,
                               scale_optimizer=first.scale_optimizer)
    path = ckpt.write(str(tmp_path / "ckpt"))
    resumed = _model()
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer,
                        scale_optimizer=resumed.scale_optimizer).read(path).assert_consumed()
    _train(resumed, X[8 * 4:], Y[8 * 4:])
    for a, b in zip(model.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
