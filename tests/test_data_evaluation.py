"""Per-domain accuracy against models whose predictions are known, and model selection."""
import keras
import numpy as np
import pytest

from fqat_tf import defaults
from fqat_tf.data import DataError, eval_streams, evaluate, load_splits, select_best
from fqat_tf.data.synthetic import class_level, write_image_tree

CLASSES = ("c0", "c1", "c2", "c3")


class LevelModel(keras.Model):
    """Reads the class from the flat grey level of a synthetic image; optionally always wrong on
    one class (predicts the next class instead)."""

    def __init__(self, wrong_on=None):
        super().__init__()
        self.wrong_on = wrong_on

    def call(self, x, training=False):
        level = (keras.ops.mean(x[..., 0], axis=(1, 2)) * defaults.IMAGENET_STD[0]
                 + defaults.IMAGENET_MEAN[0]) * 255.0
        label = keras.ops.cast(keras.ops.round((level - class_level(0))
                                               / (class_level(1) - class_level(0))), "int32")
        if self.wrong_on is not None:
            label = keras.ops.where(label == self.wrong_on, (label + 1) % len(CLASSES), label)
        return keras.ops.one_hot(label, len(CLASSES))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("levels"))
    counts = {(d, c): 2 + (i * 3 + j) % 4 for i, d in enumerate("abc")
              for j, c in enumerate(CLASSES)}
    write_image_tree(root, ["a", "b", "c"], CLASSES, images_per_class=counts, size=(9, 7),
                     noise=0.0)
    return load_splits("image_folder", root, test_domains="b", image_size=8, seed=0)


def _expected(splits, accuracy_of_labels):
    out = {}
    for part, sources in (("val", splits.val), ("test", splits.test)):
        for name, source in sources.items():
            out[f"{part}/{name}"] = accuracy_of_labels(source.split_labels())
        out[f"{part}_avg"] = float(np.mean([out[f"{part}/{n}"] for n in sources]))
    return out


def test_a_perfect_model_scores_one(splits):
    results = evaluate(LevelModel(), eval_streams(splits, batch_size=3), verbose=0)
    assert results == _expected(splits, lambda labels: 1.0)
    assert set(results) == {"val/a", "val/c", "val_avg", "test/b", "test_avg"}


def test_known_mistakes_give_known_accuracies(splits):
    results = evaluate(LevelModel(wrong_on=1), eval_streams(splits, batch_size=3), verbose=0)
    expected = _expected(splits, lambda labels: float(np.mean(labels != 1)))
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    # The test domain has every class, so the mistakes are visible there.
    assert results["test/b"] < 1.0


def test_constant_model_scores_the_class_frequency(splits):
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Flatten(),
        keras.layers.Dense(4, kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant([0.0, 0.0, 1.0, 0.0]))])
    results = evaluate(model, eval_streams(splits, batch_size=5), verbose=0)
    expected = _expected(splits, lambda labels: float(np.mean(labels == 2)))
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key


def test_averages_are_unweighted_over_domains(splits):
    results = evaluate(LevelModel(wrong_on=0), eval_streams(splits, batch_size=4), verbose=0)
    assert results["val_avg"] == pytest.approx((results["val/a"] + results["val/c"]) / 2)


def test_progress_bar(splits, capsys):
    evaluate(LevelModel(), eval_streams(splits, batch_size=2), verbose=1)
    shown = capsys.readouterr().out
    n_batches = sum(-(-len(s) // 2) for s in [*splits.val.values(), *splits.test.values()])
    assert f"{n_batches}/{n_batches}" in shown
    evaluate(LevelModel(), eval_streams(splits, batch_size=2), verbose=0)
    assert capsys.readouterr().out == ""


def test_evaluate_rejects_unknown_parts(splits):
    with pytest.raises(DataError, match=r"unknown evaluation part\(s\) \['train'\]"):
        evaluate(LevelModel(), {"train": {}}, verbose=0)


def test_mnist_streams_evaluate():
    mnist = load_splits("rotated_mnist_5k", test_domains=["0"], seed=0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, kernel_initializer="zeros")])
    results = evaluate(model, eval_streams(mnist, batch_size=256), verbose=0)
    # All logits equal: argmax is class 0 everywhere.
    labels = mnist.test["0"].split_labels()
    assert results["test/0"] == pytest.approx(np.mean(labels == 0))
    assert len([k for k in results if k.startswith("val/")]) == 5


RECORDS = [
    {"step": 300, "val_avg": 0.70, "val/a": 0.9, "test_avg": 0.99},
    {"step": 600, "val_avg": 0.80, "val/a": 0.6, "test_avg": 0.50},
    {"step": 900, "val_avg": 0.80, "val/a": 0.7, "test_avg": 0.60},
    {"step": 1200, "val_avg": 0.75, "val/a": 0.8, "test_avg": 0.70},
]


def test_select_best_uses_validation_and_the_earliest_tie():
    assert select_best(RECORDS)["step"] == 600
    assert select_best(list(reversed(RECORDS)))["step"] == 600
    assert select_best(RECORDS, key="val/a")["step"] == 300


@pytest.mark.parametrize("records, key, message", [
    (RECORDS, "test_avg", "training-domain validation accuracy only"),
    (RECORDS, "test/b", "training-domain validation accuracy only"),
    ([], "val_avg", "no evaluation records"),
    ([{"val_avg": 0.5}], "val_avg", "record 0 has no 'step'"),
    ([{"step": 3}], "val_avg", "at step 3 has no 'val_avg'"),
    ([{"step": 3, "val_avg": float("nan")}], "val_avg", "val_avg=nan is not a finite number"),
    ([{"step": 3, "val_avg": "0.5"}], "val_avg", "is not a finite number"),
])
def test_select_best_rejects(records, key, message):
    with pytest.raises(DataError, match=message):
        select_best(records, key=key)
