"""MirroredStrategy on 2 logical CPUs trains exactly like one device on the same global batch.

The perturbation norm and the g_va signs must come from the all-reduced gradients; with the
per-replica gradients instead, weights, signs and masks would differ from the one-device run.
"""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import freeze
from fqat_tf.fqat_model import FQATModel
from helpers import mirrored, split, toy_quant_model


def train(strategy, method, steps=3):
    """Weights (model, freeze state) and scale-optimizer variables after `steps` steps."""
    rng = np.random.RandomState(5)
    x, y = rng.randn(16 * steps, 5).astype("float32"), rng.randint(0, 3, 16 * steps)
    with strategy.scope():
        keras.utils.set_random_seed(21)
        q = toy_quant_model()
        model = FQATModel(q, method, rho=0.3, alpha=0.01, scale_vars=split(q)[1],
                          freeze_interval=2)
        model.compile(optimizer=keras.optimizers.Adam(0.05),
                      scale_optimizer=keras.optimizers.Adam(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    callback = freeze.DisorderFreezeCallback(threshold=0.6)
    model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    return ([v.numpy() for v in model.weights]
            + [v.numpy() for v in model.scale_optimizer.variables]), callback.records


def compare(method, collective=False):
    """Largest absolute difference between the mirrored and the one-device run."""
    one, one_records = train(tf.distribute.get_strategy(), method)
    two, two_records = train(mirrored(collective), method)
    assert len(one) == len(two)
    assert [r["mask"] for r in one_records] == [r["mask"] for r in two_records]
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(one, two))


@pytest.mark.parametrize("method", ["lsq", "lsq_sagm", "fqat", "freeze_both", "alter"])
def test_mirrored_matches_one_device(method):
    assert compare(method) <= 1e-5


def test_freezing_happens_in_the_compared_run():
    _, records = train(tf.distribute.get_strategy(), "fqat")
    assert any(0.0 in r["mask"].values() for r in records)


def test_mirrored_with_collective_all_reduce():
    # The default CPU cross-device ops use collectives; a fresh process keeps their keys apart
    # from strategies other tests created.
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import conftest, test_distributed as t; "
            "print('DIFF', t.compare('fqat', collective=True))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("DIFF")[-1])
    assert diff <= 1e-5
