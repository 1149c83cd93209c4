"""Reproducible runs: `--deterministic` reruns give the same bits, and a run killed anywhere
resumes to the same bits as one never interrupted (docs/algorithm.md §4).

The quickstart-sized check runs the real program in subprocesses at the shipped batch
(5 domains x 16 images) for 60 QAT steps, killed and resumed; the per-method checks rerun
small runs of every method in this process.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import assert_same_bits, final_state
from helpers import parse_train_flags
from fqat_tf import rundir, runtime, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "train_under_test.py")
STEPS = 60
# Checkpoints every 15 steps fall inside freeze windows (K = 20), so a resume has to restore a
# half-counted window.
QUICKSTART = ["--flagfile=experiments/quickstart.cfg", "--erm_steps=20", f"--steps={STEPS}",
              "--eval_every=15", "--deterministic", "--verbose=0"]
# Kill points of one interrupted run, in order: calibration, mid-window and mid-interval, right
# after an evaluation, during a checkpoint write, during final writing. Before the run after the
# checkpoint-write kill, the latest intact checkpoint (ckpt-30) is truncated as well.
KILLS = ["calibration", "step:25", "after_eval:30", "checkpoint:45", "final"]
TRUNCATED = "ckpt-30"


def _env():
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)


def _train(out, erm, *extra, point=None):
    prefix = [sys.executable, PROGRAM, f"--kill={point}", "--"] if point else \
        [sys.executable, "-m", "fqat_tf.train"]
    return subprocess.run(prefix + QUICKSTART + [f"--output_dir={out}",
                                                 f"--erm_cache_dir={erm}", *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)


def _results(run_dir):
    results = rundir.read_results(run_dir)
    results.pop("wall_time_s")
    return results


def _files(run_dir):
    names = (rundir.EVALS, rundir.DISORDER_CSV, rundir.GRADIENTS_CSV)
    return {n: open(os.path.join(run_dir, n)).read() for n in names}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One uninterrupted deterministic quickstart run (its ERM stage cached for the others)."""
    base = tmp_path_factory.mktemp("reproducible")
    erm, out = str(base / "erm"), str(base / "straight")
    done = _train(out, erm)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"erm": erm, "out": out, "state": final_state(out)}


def _truncate(checkpoints, name):
    data = os.path.join(checkpoints, f"{name}.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def test_killed_at_five_points_resumes_to_the_same_bits(quickstart, tmp_path):
    """Each segment of the interrupted run is computed by a fresh process, from step 0 or from
    a checkpoint, so matching the straight run's bits is also the check that two processes
    compute the same steps (the per-method tests below rerun whole runs)."""
    out = str(tmp_path / "killed")
    ckpts = os.path.join(out, rundir.CHECKPOINTS)
    logs = []
    for point in KILLS:
        killed = _train(out, quickstart["erm"], point=point)
        assert killed.returncode == -9, (point, killed.stderr[-3000:])
        assert not rundir.is_finished(out), point
        logs.append(killed.stderr)
        if point.startswith("checkpoint:"):
            assert any("_temp" in n for n in os.listdir(ckpts)), "no checkpoint write was cut"
            _truncate(ckpts, TRUNCATED)
    # The run after the truncation fell back to the checkpoint before it, and deleted it.
    assert f"{TRUNCATED} cannot be restored" in logs[-1], logs[-1][-3000:]
    assert f"resumed {out} at step 15" in logs[-1], logs[-1][-3000:]
    assert not any(n.startswith(f"{TRUNCATED}.") for n in os.listdir(ckpts))
    stale = [n for n in os.listdir(ckpts) if "_temp" in n]
    assert stale == [], "the checkpoint-write kill should have been cleaned by the next run"
    done = _train(out, quickstart["erm"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {out} at step {STEPS}" in done.stderr, done.stderr[-3000:]
    # The freeze state (its window sums and masks) is saved and compared with the model.
    assert any(k.startswith("variables/") for k in quickstart["state"])
    assert_same_bits(quickstart["state"], final_state(out))
    assert _results(out) == _results(quickstart["out"])
    assert _files(out) == _files(quickstart["out"])


SMALL = ["--dataset=rotated_mnist_5k", "--test_domains=75", "--lr=1e-3", "--scale_lr=1e-3",
         "--erm_steps=6", "--steps=8", "--eval_every=4", "--batch_per_domain=4",
         "--calibration_batches=1", "--eval_batch_size=256", "--verbose=0", "--deterministic"]
QUANTIZED = ["--freeze_interval=3", "--weight_bits=4", "--activation_bits=4"]


@pytest.fixture
def deterministic():
    # TensorFlow has no public switch back from op determinism; it stays on for the rest of
    # this test process (it only makes ops deterministic), the graph optimizer comes back on.
    runtime.enable_determinism()
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})


@pytest.mark.parametrize("method", [
    ["--method=erm"],
    ["--method=lsq"] + QUANTIZED,
    ["--method=lsq_sagm"] + QUANTIZED,
    ["--method=fqat"] + QUANTIZED,
    ["--method=ewgs", "--ewgs_delta_mode=hessian", "--ewgs_hessian_interval=3"] + QUANTIZED,
    ["--method=fqat", "--int8_storage", "--calibration_source=quantized"] + QUANTIZED,
], ids=["erm", "lsq", "lsq_sagm", "fqat", "ewgs_hessian", "fqat_int8_storage"])
def test_every_method_reruns_bit_identical(method, tmp_path, deterministic):
    states, results = [], []
    for name in ("a", "b"):
        # The erm case compares two ERM stages; a quantized method's runs share theirs, so
        # their comparison is of the QAT stage alone.
        erm = tmp_path / (f"{name}_erm" if method == ["--method=erm"] else "erm")
        s = parse_train_flags(SMALL + method + [f"--output_dir={tmp_path / name}",
                                                f"--erm_cache_dir={erm}"])
        results.append(trainer.run(s))
        states.append(final_state(str(tmp_path / name)))
    assert_same_bits(*states)
    for r in results:
        r.pop("wall_time_s")
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)
    shutil.rmtree(tmp_path)
