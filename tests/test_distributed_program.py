"""The training program at any scale: one device, two mirrored replicas and two worker
processes on 127.0.0.1 train the same run (same global batch, same weights to 1e-5, same
freeze decisions), only the chief writes the run's files, and when the chief of a
multi-worker run is killed with SIGKILL the other worker stops naming it, and both restarted
resume exactly."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_same_bits, final_state
from fqat_tf import rundir, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "train_under_test.py")
# The global batch: 5 domains x 4 images, 2 per replica with two replicas. Sums over replicas
# differ from sums over one batch in the last bits, and in its first steps Adam turns any
# gradient element into a step of about +-lr whatever its size, so a near-zero element whose
# sign differs moves 2 lr apart: a small learning rate keeps such steps below the 1e-5 the
# layouts are compared to.
TINY = ["--flagfile=experiments/quickstart.cfg", "--erm_steps=4", "--steps=8", "--eval_every=4",
        "--batch_per_domain=4", "--freeze_interval=3", "--calibration_batches=1",
        "--eval_batch_size=512", "--lr=5e-7", "--scale_lr=5e-7", "--deterministic",
        "--verbose=0"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _command(out, erm, *own):
    return [sys.executable, PROGRAM, *own, "--", *TINY, f"--output_dir={out}",
            f"--erm_cache_dir={erm}"]


def _ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _workers(out, erm, kills=(None, None)):
    """Runs the program as two workers of one multi-worker run; returns both processes.

    `kills`: each worker's kill point (`train_under_test.py`), or None.
    """
    ports = _ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [subprocess.Popen(
        _command(out, erm, *([f"--kill={kills[i]}"] if kills[i] else [])) +
        ["--strategy=multiworker"], cwd=ROOT,
        env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": i}})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        p.stdout_text, p.stderr_text = p.communicate(timeout=900)
    return procs


def _single(out, erm, *own, strategy="default"):
    done = subprocess.run(_command(out, erm, *own) + [f"--strategy={strategy}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _masks(run_dir):
    rows = rundir.read_csv(os.path.join(run_dir, rundir.DISORDER_CSV),
                           ("step", "variable", "disorder", "flat_disorder", "mask"))
    return [(r[0], r[1], r[4]) for r in rows]


def assert_same_run(a, b):
    """Two runs of one setting on different device layouts: the model's variables (weights,
    scales, freeze state) to 1e-5, the same freeze decisions and accuracies. Optimizer moments
    are not compared: a last-bit difference in an activation moves its quantization by a whole
    step, so gradients (not weights) may differ by far more than 1e-5."""
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    # The optimizers' slot lists (`_variables`) hold the moments; the model's own variables are
    # keyed by the first path to them (the optimizers' `_trainable_variables`, or `model/`).
    weights = [k for k in sa if "/_variables/" not in k]
    assert len(weights) > 20
    for k in weights:
        np.testing.assert_allclose(sa[k], sb[k], rtol=0, atol=1e-5, err_msg=k)
    assert _masks(a) == _masks(b) and _masks(a)
    ra, rb = rundir.read_results(a), rundir.read_results(b)
    assert (ra["val"], ra["test"], ra["final_masks"]) == (rb["val"], rb["test"], rb["final_masks"])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    base = tmp_path_factory.mktemp("one_device")
    _single(str(base / "run"), str(base / "erm"))
    return str(base / "run")


def test_mirrored_on_two_logical_cpus_trains_the_same_run(one_device, tmp_path):
    out = str(tmp_path / "run")
    _single(out, str(tmp_path / "erm"), "--logical_cpus=2", strategy="mirrored")
    assert_same_run(one_device, out)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """A finished two-worker run: (base folder, run directory, ERM cache, both processes)."""
    base = tmp_path_factory.mktemp("two_workers")
    out, erm = str(base / "run"), str(base / "erm")
    return base, out, erm, _workers(out, erm)


def test_two_workers_train_the_same_run_and_only_the_chief_writes(one_device, two_workers):
    base, out, erm, procs = two_workers
    assert [p.returncode for p in procs] == [0, 0], [p.stderr_text[-2000:] for p in procs]
    assert_same_run(one_device, out)
    checkpoints = os.listdir(os.path.join(out, rundir.CHECKPOINTS))
    assert not [n for n in checkpoints if n.startswith(".worker")], checkpoints
    finished = [d for d, _, files in os.walk(base) if rundir.RESULTS in files]
    assert sorted(finished) == sorted([out, os.path.join(erm, os.listdir(erm)[0])])
    assert json.loads(procs[0].stdout_text.splitlines()[-1])["val_avg"] == \
        rundir.read_results(out)["val_avg"]


def test_a_killed_chief_stops_its_worker_by_name_and_both_restart_exactly(two_workers,
                                                                          tmp_path):
    _, straight, erm, procs = two_workers
    assert [p.returncode for p in procs] == [0, 0]
    out = str(tmp_path / "killed")
    # Only the chief dies (SIGKILL after step 6): the other worker fails at its next
    # collective and says which task stopped and what to do, with no traceback.
    killed = _workers(out, erm, kills=("step:6", None))
    assert [p.returncode for p in killed] == [-9, 1], [p.stderr_text[-2000:] for p in killed]
    last = killed[1].stderr_text.strip().splitlines()[-1]
    assert last.startswith(f"fqat_tf.train: error: {out}: /job:worker/task:0 of the cluster "
                           f"stopped"), last
    assert "restart every worker" in last and "Traceback" not in killed[1].stderr_text
    assert not rundir.is_finished(out)
    resumed = _workers(out, erm)
    assert [p.returncode for p in resumed] == [0, 0], [p.stderr_text[-2000:] for p in resumed]
    assert f"resumed {out} at step 4" in resumed[0].stderr_text
    assert_same_bits(final_state(straight), final_state(out))


def test_an_unavailable_service_outside_a_cluster_is_not_a_lost_worker():
    # Only a multi-worker run reads a collective's failure as a stopped worker.
    with pytest.raises(tf.errors.UnavailableError):
        with runtime.worker_loss_named(tf.distribute.get_strategy(), "run"):
            raise tf.errors.UnavailableError(
                None, None, "Collective ops is aborted by: /job:worker/replica:0/task:1")


@pytest.mark.parametrize("tf_config,culprit", [
    (None, "--strategy=multiworker needs a cluster: set TF_CONFIG"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "TF_CONFIG: 'task' must name a job of the cluster and an index in it"),
])
def test_bad_cluster_is_refused_before_any_run_directory(tf_config, culprit, tmp_path):
    env = _env() if tf_config is None else _env(TF_CONFIG=tf_config)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fqat_tf.train", *TINY, "--strategy=multiworker",
                           f"--output_dir={out}", f"--erm_cache_dir={tmp_path / 'erm'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"fqat_tf.train: error: {culprit}" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "erm").exists()
