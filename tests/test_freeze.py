"""Gradient disorder, mask rules, the freeze state and DisorderFreezeCallback (docs/algorithm.md §3)."""
import glob

import keras
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import freeze
from fqat_tf import methods
from fqat_tf.fqat_model import FQATModel
from helpers import split, toy_quant_model


@pytest.mark.parametrize("signs,expected", [
    ([1, 1, 1, 1], 0.0),
    ([-1, -1, -1], 0.0),
    ([1, -1, 1, -1, 1], 1.0),
    ([1, 1, -1, -1, 1], 0.5),          # flips at 2 of 4 adjacent pairs
    ([1, 0, 1], 1.0),                  # a zero gradient differs in sign from both neighbours
    ([0.3, 2.0, -1e-9, -5.0], 1 / 3),  # raw gradients: only their signs count
    ([[1, 1], [1, -1], [1, 1]], 0.5),  # per-channel: element 0 never flips, element 1 always
])
def test_gradient_disorder_hand_computed(signs, expected):
    assert freeze.gradient_disorder(signs) == pytest.approx(expected)


def test_gradient_disorder_rejects_short_windows():
    with pytest.raises(ValueError, match="at least 2 steps"):
        freeze.gradient_disorder([1.0])
    with pytest.raises(ValueError, match="no elements"):
        freeze.gradient_disorder(np.zeros((3, 0)))


def _apply_rule(name, disorders, threshold=0.3):
    rule = methods.METHODS[name].mask_rule
    masks = np.ones(len(disorders[0]), np.float32)
    history = []
    for d in disorders:
        masks = rule(np.asarray(d), threshold, masks)
        history.append(masks.tolist())
    return history


SCRIPT = [[0.1, 0.5, 0.3], [0.6, 0.1, 0.35], [0.2, 0.9, 0.29]]


def test_fqat_rule_freezes_below_threshold_and_unfreezes():
    assert _apply_rule("fqat", SCRIPT) == [[0, 1, 1], [1, 0, 1], [0, 1, 0]]
    assert _apply_rule("freeze_both", SCRIPT) == _apply_rule("fqat", SCRIPT)


def test_reverse_rule_freezes_above_threshold():
    assert _apply_rule("reverse", SCRIPT) == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_no_unfreeze_rule_keeps_frozen_scales_frozen():
    assert _apply_rule("no_unfreeze", SCRIPT) == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_methods_without_a_rule():
    for name in ("erm", "sagm", "lsq", "lsq_sagm", "alter"):
        assert methods.METHODS[name].mask_rule is None, name
    with pytest.raises(ValueError, match="unknown method 'fqatt'"):
        methods.get("fqatt")


def test_resolve_follows_the_training_program_aliases():
    assert methods.resolve("ewgs") is methods.METHODS["lsq"]
    assert methods.resolve("ewgs_sagm") is methods.METHODS["lsq_sagm"]
    assert methods.resolve("fqat").masked and not methods.resolve("ewgs_sagm").masked
    with pytest.raises(ValueError, match="unknown method 'ewg'"):
        methods.resolve("ewg")


def _model(method, window, **kwargs):
    q = toy_quant_model()
    model = FQATModel(q, method, scale_vars=split(q)[1], freeze_interval=window, **kwargs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_flip_counts_give_the_window_disorder():
    state = _model("fqat", 4).freeze_state
    seq = [1, -1, -1, 1, 1, 1, -1, 0]
    for i, v in enumerate(seq):
        state.record([tf.constant(float(v)), tf.constant(2.0)])
        # Without a configured interval no decision is taken: one window grows.
        np.testing.assert_allclose(
            state.window_disorder(),
            [freeze.gradient_disorder(seq[:i + 1]), 0.0] if i else [np.nan, np.nan])
    assert int(state.count.numpy()) == 8 and int(state.step.numpy()) == 8
    assert int(state.decisions.numpy()) == 0
    np.testing.assert_array_equal(state.masks.numpy(), [1, 1])
    with pytest.raises(ValueError, match="2..4"):
        state.configure(5, 0.3)


@pytest.mark.parametrize("method,expected", [
    ("fqat", [[0, 1], [1, 0]]),
    ("reverse", [[1, 0], [0, 1]]),
    ("no_unfreeze", [[0, 1], [0, 0]]),
    ("lsq_sagm", [[1, 1], [1, 1]]),
])
def test_callback_applies_the_method_rule(method, expected):
    model = _model(method, 5, record_signs=True)
    callback = freeze.DisorderFreezeCallback(interval=5, threshold=0.4)
    callback.set_model(model)
    callback.on_train_begin()
    state = model.freeze_state
    # Window 1: scale 0 steady (disorder 0), scale 1 flipping (disorder 1).
    # Window 2: the reverse.
    windows = [([1, 1, 1, 1, 1], [1, -1, 1, -1, 1]), ([1, -1, 1, -1, 1], [-1, -1, -1, -1, -1])]
    for (a, b), want in zip(windows, expected):
        for i, (sa, sb) in enumerate(zip(a, b)):
            state.record([tf.constant(0.01 * sa), tf.constant(-2.0 * sb)])
            callback.on_train_batch_end(i)
        np.testing.assert_array_equal(state.masks.numpy(), want)
        assert int(state.count.numpy()) == 0
    assert [r["step"] for r in callback.records] == [5, 10]
    np.testing.assert_allclose(list(callback.records[0]["disorder"].values()), [0.0, 1.0])


def test_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="interval"):
        freeze.DisorderFreezeCallback(interval=1)
    with pytest.raises(ValueError, match="threshold"):
        freeze.DisorderFreezeCallback(threshold=1.5)
    callback = freeze.DisorderFreezeCallback(interval=9)
    callback.set_model(_model("fqat", 4))
    with pytest.raises(ValueError, match="exceeds the model's freeze_interval=4"):
        callback.on_train_begin()
    callback.set_model(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="needs an fqat_tf.FQATModel"):
        callback.on_train_begin()


def test_fit_logs_disorder_to_history_and_tensorboard(tmp_path):
    model = _model("fqat", 3)
    rng = np.random.RandomState(0)
    x, y = rng.randn(48, 5).astype("float32"), rng.randint(0, 3, 48)
    callback = freeze.DisorderFreezeCallback(threshold=0.5, log_dir=tmp_path / "tb")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
                        callbacks=[callback])
    assert [r["step"] for r in callback.records] == [3, 6, 9, 12]
    names = model.freeze_state.scale_names
    for name in names:
        assert len(history.history[f"disorder/{name}"]) == 2
        assert history.history[f"mask/{name}"][-1] == callback.records[-1]["mask"][name]
    assert len(history.history["frozen"]) == 2
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert events
    logged = {(v.tag, e.step): float(tf.make_ndarray(v.tensor))
              for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
    for record in callback.records:
        for name in names:
            assert logged[(f"disorder/{name}", record["step"])] == pytest.approx(
                record["disorder"][name])
            assert logged[(f"mask/{name}", record["step"])] == record["mask"][name]
    last = callback.records[-1]["mask"].values()
    assert logged[("frozen_fraction", 12)] == pytest.approx(1.0 - np.mean(list(last)))
