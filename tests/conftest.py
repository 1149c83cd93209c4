"""Test-wide TensorFlow set-up.

Two logical CPU devices are configured before TensorFlow initialises its runtime, so the
MirroredStrategy tests can run on a one-CPU machine; every other test uses the default device.
"""
import os
import shlex
import sys

# The programs' own default (fqat_tf.cli): the subprocesses the tests start inherit it, and a
# CPU-only machine's "failed call to cuInit" is an ERROR line TensorFlow would print at 2.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

# Helpers shared by several test modules live in helpers.py (imported as `from helpers import`).
from helpers import FAKE_TRAIN  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import keras
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.backend.clear_session()


# Bookkeeping that differs between an interrupted and an uninterrupted run by design.
NOT_COMPARED = ("wall_time_s", "save_counter", "iterator")


def final_state(run_dir):
    """Every variable of a run's last checkpoint except bookkeeping, by checkpoint key."""
    from fqat_tf import rundir

    reader = tf.train.load_checkpoint(os.path.join(run_dir, rundir.CHECKPOINTS))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith("_CHECKPOINTABLE") and not any(n in k for n in NOT_COMPARED)}


def assert_same_bits(a, b):
    """Two final states hold the same variables with the same bits."""
    assert a.keys() == b.keys() and len(a) > 20
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} variables differ, e.g. {differ[:5]}"


@pytest.fixture
def fake(tmp_path):
    """(--train_command value, calls log) of the stand-in training program
    (`helpers.FAKE_TRAIN`)."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'fake_train.py'))}"
    return command, str(tmp_path / "calls.jsonl")
