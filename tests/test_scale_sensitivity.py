"""fqat_tf.scale_sensitivity on a tiny run trained here by the training program (paper Table 3)."""
import csv
import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from fqat_tf import data, rundir, scale_sensitivity
from fqat_tf.quantize import quantize_wrappers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A QAT run of a few seconds: ERM 60 steps then FQAT 20 steps of a width-8 MNIST CNN.
TINY_RUN = ["--dataset=rotated_mnist_5k", "--test_domains=75", "--method=fqat", "--width=8",
            "--erm_steps=60", "--steps=20", "--batch_per_domain=8", "--eval_every=20",
            "--freeze_interval=5", "--calibration_batches=1", "--lr=1e-3", "--scale_lr=1e-3",
            "--weight_decay=0", "--verbose=0"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    run_dir = str(root / "run")
    proc = subprocess.run([sys.executable, "-m", "fqat_tf.train", *TINY_RUN,
                           f"--output_dir={run_dir}", f"--erm_cache_dir={root / 'erm'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _snapshot(model):
    return {v.path: keras.ops.convert_to_numpy(v).tobytes() for v in model.weights}


def test_factor_one_reproduces_the_run_and_rows_match_an_independent_scaling(trained, tmp_path):
    prefix = str(tmp_path / "table3")
    proc = subprocess.run([sys.executable, "-m", "fqat_tf.scale_sensitivity", trained,
                           "--factors=0.5,1,1.1", f"--out={prefix}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = rundir.read_results(trained)
    rows = list(csv.DictReader(io.StringIO(open(prefix + ".csv").read())))
    unchanged = float(rows[0]["test/75"])
    assert rows[0]["layer"] == "" and unchanged == results["test"]["75"]  # exactly
    assert "reproduces the run's results.json test accuracy" in open(prefix + ".md").read()
    assert "| Layer | unchanged | 50% | 100% | 110% |" in proc.stdout
    layers = [r["layer"] for r in rows[1::3]]
    assert layers == ["conv1", "conv2", "conv3", "conv4"]  # the classifier stays float
    assert rows[1]["variables"] == "conv1/input_step"  # first conv: input only
    assert rows[4]["variables"] == "conv2/kernel_step conv2/input_step"
    for r in rows[1:]:
        if r["factor"] == "1":
            assert float(r["test/75"]) == unchanged
    halved = {r["layer"]: float(r["test/75"]) for r in rows if r["factor"] == "0.5"}
    assert any(v != unchanged for v in halved.values())  # a halved step changes the model

    # Independently: a fresh copy of the model with conv3's steps halved by hand.
    model = keras.saving.load_model(os.path.join(trained, rundir.MODEL))
    conv3 = next(w for w in quantize_wrappers(model) if w.name == "conv3")
    for v in conv3.scale_variables:
        v.assign(keras.ops.convert_to_numpy(v) * np.float32(0.5))
    streams = scale_sensitivity.evaluation_streams(rundir.read_json(
        os.path.join(trained, rundir.FLAGS_JSON)))
    assert data.evaluate(model, {"test": streams["test"]}, verbose=0)["test/75"] == \
        halved["conv3"]


def test_every_step_is_restored_bit_exactly(trained):
    flags = rundir.read_json(os.path.join(trained, rundir.FLAGS_JSON))
    model = keras.saving.load_model(os.path.join(trained, rundir.MODEL))
    before = _snapshot(model)
    streams = scale_sensitivity.evaluation_streams(flags)
    layers = scale_sensitivity.quantized_layers(model, "conv[24]", per="variable")
    assert [name for name, _ in layers] == ["conv2/kernel_step", "conv2/input_step",
                                            "conv4/kernel_step", "conv4/input_step"]
    table = scale_sensitivity.sensitivity(model, streams, (0.25, 4.0), layers)
    assert _snapshot(model) == before
    assert [r["layer"] for r in table["rows"]] == [name for name, _ in layers]
    assert set(table["rows"][0]["accuracy"]) == {0.25, 4.0}


@pytest.mark.parametrize("text, match", [("0.9,0", "'0' must be a number > 0"),
                                         ("0.9,-1", "'-1' must be a number > 0"),
                                         ("1.1,x", "'x' is not a number"),
                                         ("nan", "'nan' must be a number > 0"),
                                         ("0.9,0.9", "'0.9' given twice")])
def test_bad_factors_are_named(text, match):
    with pytest.raises(scale_sensitivity.SensitivityError, match=match):
        scale_sensitivity.parse_factors(text)
    assert scale_sensitivity.parse_factors("0.9,0.95,1.05,1.1") == (0.9, 0.95, 1.05, 1.1)
