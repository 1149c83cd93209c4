"""Files deleted or damaged after start-up: the input error names the file."""
import os

import pytest
import tensorflow as tf

from fqat_tf.data import DataError, eval_streams, explain_input_error, load_splits, train_stream
from fqat_tf.data.synthetic import write_image_tree


@pytest.fixture
def splits(tmp_path):
    root = str(tmp_path / "a tree: >> named")  # The guard's delimiters do not confuse it.
    write_image_tree(root, ["a", "b", "c"], ["x", "y"], images_per_class=4, size=(16, 16),
                     formats=("jpg", "png"))
    # 8 images per domain, 1 held out: an epoch of domain a every 3.5 steps of 2.
    return load_splits("image_folder", root, test_domains="c", image_size=8, seed=0)


def _train_error(splits, damage):
    iterator = iter(train_stream(splits, 2, seed=0))
    next(iterator)
    damage()
    with pytest.raises(tf.errors.OpError) as info:
        for _ in range(40):
            next(iterator)
    return info.value


def test_a_deleted_training_file_is_named(splits):
    victim = str(splits.train["b"].paths[splits.train["b"].indices[3]])
    error = explain_input_error(_train_error(splits, lambda: os.remove(victim)))
    assert isinstance(error, DataError)
    assert str(error) == (f"image file {victim} no longer exists: it was deleted or moved after "
                          f"the run started")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_training_file_is_named(splits, damage):
    victim = str(splits.train["a"].paths[splits.train["a"].indices[0]])
    with open(victim, "rb") as f:
        data = f.read()
    new = data[:len(data) // 2] if damage == "truncated" else b"not an image at all"

    def write():
        with open(victim, "wb") as f:
            f.write(new)

    error = explain_input_error(_train_error(splits, write))
    assert isinstance(error, DataError)
    assert str(error).startswith(f"image file {victim} could not be read or decoded during the "
                                 f"run: it was changed or damaged after the run started "
                                 f"({len(new)} bytes now)")


def test_the_last_file_of_an_evaluation_stream_is_checked_too(splits):
    source = splits.test["c"]
    victim = str(source.paths[source.indices[-1]])
    os.remove(victim)
    with pytest.raises(tf.errors.OpError) as info:
        for _ in eval_streams(splits, batch_size=3)["test"]["c"]:
            pass
    assert victim in str(explain_input_error(info.value))


@pytest.mark.parametrize("where", ["eager", "dataset"])
def test_tensorflow_own_read_error_is_explained(tmp_path, where):
    missing = str(tmp_path / "gone: really>>" / "x.jpg")
    with pytest.raises(tf.errors.NotFoundError) as info:
        if where == "eager":
            tf.io.read_file(missing)
        else:
            list(tf.data.Dataset.from_tensors(missing).map(tf.io.read_file))
    assert str(explain_input_error(info.value)).startswith(f"image file {missing} no longer")


def test_an_error_that_names_no_input_file_is_not_a_data_error():
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        tf.linalg.matmul(tf.ones([2, 3]), tf.ones([2, 3]))
    assert explain_input_error(info.value) is None
