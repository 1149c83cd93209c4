"""FQATModel as a Keras model: `.keras` save and load of the whole trainer (method, rho, alpha,
freeze state, both optimizers) and Keras's own callbacks in `fit`."""
import glob
import os

import keras
import numpy as np
import pytest

import fqat_tf
from fqat_tf.fqat_model import FQATModel

STEPS_PER_EPOCH, K = 3, 2       # epochs end in the middle of a freeze window
RNG = np.random.RandomState(2)
X = RNG.randn(8 * STEPS_PER_EPOCH, 8, 8, 3).astype("float32")
Y = RNG.randint(0, 3, 8 * STEPS_PER_EPOCH)


def _model(method="fqat"):
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    qmodel = fqat_tf.quantize_model(keras.Model(inp, out), weight_bits=4, activation_bits=4)
    model = FQATModel(qmodel, method, rho=0.2, alpha=0.01, freeze_interval=K,
                      weight_decay=1e-3)
    # Eager steps: bit-reproducible whatever TensorFlow's graph optimizer does.
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  scale_optimizer=keras.optimizers.Adam(0.03),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], run_eagerly=True)
    return model


def _fit(model, epochs, initial_epoch=0, callbacks=()):
    return model.fit(X, Y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch,
                     shuffle=False, verbose=0,
                     callbacks=[fqat_tf.DisorderFreezeCallback(threshold=0.5), *callbacks])


def _assert_same(a, b):
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)
    for opt in ("optimizer", "scale_optimizer"):
        for x, y in zip(getattr(a, opt).variables, getattr(b, opt).variables):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=f"{opt} {x.path}")


@pytest.fixture(scope="module")
def straight():
    model = _model()
    _fit(model, 4)
    assert int(model.freeze_state.decisions.numpy()) == 4 * STEPS_PER_EPOCH // K
    return model


def test_keras_file_saves_the_trainer_and_training_continues_exactly(straight, tmp_path):
    first = _model()
    _fit(first, 2)
    assert int(first.freeze_state.count.numpy()) == 2 * STEPS_PER_EPOCH % K  # mid-window
    path = str(tmp_path / "trainer.keras")
    first.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FQATModel)
    assert (loaded.method.name, loaded.rho, loaded.alpha, loaded.weight_decay) == \
        ("fqat", 0.2, 0.01, 1e-3)
    assert [v.path for v in loaded.scale_variables] == [v.path for v in first.scale_variables]
    assert float(loaded.scale_optimizer.learning_rate.numpy()) == pytest.approx(0.03)
    _assert_same(first, loaded)
    _fit(loaded, 4, initial_epoch=2)
    _assert_same(straight, loaded)


def test_model_checkpoint_tensorboard_and_early_stopping_in_fit(tmp_path):
    model = _model()
    history = _fit(model, 4, callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.weights.h5"),
                                        save_weights_only=True),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)])
    # min_delta=10 counts no epoch as an improvement: training stops after the second.
    assert len(history.history["loss"]) == 2
    for epoch in (1, 2):
        restored = keras.saving.load_model(str(tmp_path / f"epoch{epoch}.keras"))
        assert isinstance(restored, FQATModel) and restored.method.name == "fqat"
        assert os.path.getsize(tmp_path / f"epoch{epoch}.weights.h5") > 0
    _assert_same(model, restored)
    assert glob.glob(str(tmp_path / "tb" / "train" / "events.out.tfevents.*"))


class _FailAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_after_an_exception_resumes_exactly(straight, tmp_path):
    backup = str(tmp_path / "backup")
    interrupted = _model()
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(interrupted, 4, callbacks=[keras.callbacks.BackupAndRestore(backup),
                                        _FailAt(epoch=2, batch=1)])
    # A new process: a fresh model, the same command.
    resumed = _model()
    _fit(resumed, 4, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    _assert_same(straight, resumed)
