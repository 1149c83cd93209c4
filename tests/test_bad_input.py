"""The training program's bad inputs, through the real command: the exit code, one message that
names the culprit, no traceback, and what is left on disk (nothing, or the run untouched).

The analysis programs' cases are in test_bad_input_analysis.py, the data trees' in
test_bad_input_data.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

from helpers import parse_train_flags
from fqat_tf import rundir, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "fqat_tf.train"
# A compiled run of a few seconds on the bundled data.
TINY = ["--flagfile=experiments/quickstart.cfg", "--erm_steps=4", "--steps=4", "--eval_every=2",
        "--batch_per_domain=2", "--freeze_interval=2", "--calibration_batches=1",
        "--eval_batch_size=512", "--verbose=0"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")


def _files(folder):
    # A lock file records its last holder's pid, not run data: a refused process takes it too.
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                  if not f.endswith(".lock"))


def _run(args, prefix=(sys.executable, "-m", PROG)):
    return subprocess.run([*prefix, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)


def refused(args, code, culprit, folder=None, prefix=(sys.executable, "-m", PROG),
            prog=PROG):
    """Runs a program; checks its refusal and, with `folder`, that no file there changed."""
    before = {p: os.path.getmtime(p) for p in _files(folder)} if folder else None
    proc = _run(args, prefix)
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert culprit in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if code == 2:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines == [errors[0], f"{prog}: run with --help for usage"], proc.stderr
    if folder is not None:
        assert {p: os.path.getmtime(p) for p in _files(folder)} == before
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny FQAT run and its ERM cache."""
    base = tmp_path_factory.mktemp("bad_input")
    out, erm = str(base / "fqat"), str(base / "erm")
    done = _run(TINY + [f"--output_dir={out}", f"--erm_cache_dir={erm}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "erm": erm, "base": base}


@pytest.mark.parametrize("args,culprit", [
    (["--weight_bits=12"], "--weight_bits: must be in 2..8, got 12"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--method=fqatt"], "--method: unknown method 'fqatt'"),
    (["--lr=-1"], "--lr: must be > 0"),
    (["--flagfile=experiments/absent.cfg"], "experiments/absent.cfg"),
    (["--verbosity=loud"], "verbosity"),
    (["stray"], "unexpected arguments ['stray']"),
])
def test_usage_errors_come_first_then_the_hint(args, culprit, tmp_path):
    refused(args + [f"--output_dir={tmp_path / 'run'}"], 2, culprit)
    assert not os.path.exists(tmp_path / "run")


def test_finished_run_with_other_settings_is_refused_not_reused(finished):
    out = finished["out"]
    other = TINY + ["--method=lsq", "--weight_bits=3", "--activation_bits=3",
                    f"--output_dir={out}", f"--erm_cache_dir={finished['erm']}"]
    refused(other, 1, "holds a finished run with other settings (activation_bits: 4 there, "
            "3 here", folder=out)
    check = _run(other + ["--check_only"])
    assert check.returncode == train.EXIT_CONFLICT and "other settings" in check.stderr
    same = _run(TINY + [f"--output_dir={out}", f"--erm_cache_dir={finished['erm']}",
                        "--check_only"])
    assert same.returncode == 0 and same.stdout.strip().endswith(": same")


def test_second_process_on_a_run_directory_exits_at_once_naming_the_holder(tmp_path):
    out, erm = tmp_path / "run", tmp_path / "erm"
    holder = subprocess.Popen([sys.executable, "-m", PROG, *TINY, "--steps=100000",
                               "--eval_every=100000", f"--output_dir={out}",
                               f"--erm_cache_dir={erm}"], cwd=ROOT, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (out / rundir.FLAGS_JSON).exists():
            assert holder.poll() is None, "the first run ended early"
            time.sleep(0.2)
        # Paused, the holder keeps its lock and writes nothing while the second one runs.
        holder.send_signal(signal.SIGSTOP)
        started = time.time()
        refused(TINY + ["--steps=100000", "--eval_every=100000", f"--output_dir={out}",
                        f"--erm_cache_dir={erm}"], 1, f"(pid {holder.pid}, holding run.lock)",
                folder=str(out))
        # Refused before its data or model is even loaded.
        assert time.time() - started < 60
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock died with its holder: the same command now resumes the run.
    assert (out / rundir.RUN_LOCK).read_text().strip() == str(holder.pid)


def test_damaged_flags_json_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.FLAGS_JSON).write_text('{"method": "fqat", ')
    refused(TINY + [f"--output_dir={out}", f"--erm_cache_dir={tmp_path / 'erm'}"], 1,
            f"{out / rundir.FLAGS_JSON}: damaged, not valid JSON", folder=str(out))


def test_damaged_evals_jsonl_is_named(tmp_path):
    out, erm = str(tmp_path / "run"), str(tmp_path / "erm")
    killed = _run(TINY + [f"--output_dir={out}", f"--erm_cache_dir={erm}"],
                  prefix=(sys.executable, os.path.join(ROOT, "tests", "train_under_test.py"),
                          "--kill=final", "--"))
    assert killed.returncode == -signal.SIGKILL
    with open(os.path.join(out, rundir.EVALS), "a") as f:
        f.write('{"step": 9, "val_avg": \n')
    refused(TINY + [f"--output_dir={out}", f"--erm_cache_dir={erm}"], 1,
            f"{os.path.join(out, rundir.EVALS)}:3: damaged evaluation record", folder=out)


def _lambda_model(path):
    inp = keras.Input((28, 28, 1))
    out = keras.layers.Lambda(lambda x: x * 2)(keras.layers.Flatten()(inp))
    keras.Model(inp, keras.layers.Dense(10)(out)).save(path)


def test_erm_cache_model_that_is_not_safe_to_load_is_refused(tmp_path):
    out, erm = tmp_path / "qat", tmp_path / "erm"
    args = TINY + [f"--output_dir={out}", f"--erm_cache_dir={erm}"]
    settings = parse_train_flags(args)
    stage = erm / trainer.erm_hash(settings)
    stage.mkdir(parents=True)
    rundir.write_json(str(stage / rundir.FLAGS_JSON), trainer.erm_settings(
        dict(settings, output_dir=str(stage))) | {"output_dir": str(stage)})
    rundir.write_json(str(stage / rundir.RESULTS), {"val_avg": 0.5})
    _lambda_model(str(stage / rundir.MODEL))
    refused(args, 1, f"{stage / rundir.MODEL}: cannot be loaded as a Keras model",
            folder=str(stage))
    assert not out.exists()


@pytest.mark.parametrize("name,content,culprit", [
    ("junk.weights.h5", b"not hdf5", "junk.weights.h5: not a converted ResNet-50"),
    ("junk.pth.tar", b"not a pickle", "junk.pth.tar: not a plain PyTorch state-dict"),
    ("absent.weights.h5", None, "absent.weights.h5: file not found"),
])
def test_bad_init_checkpoint_is_named_and_leaves_nothing(name, content, culprit, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out, erm = tmp_path / "run", tmp_path / "erm"
    args = TINY + ["--backbone=resnet50", "--width=8", f"--init=mocov2:{path}",
                   f"--output_dir={out}", f"--erm_cache_dir={erm}"]
    refused(args, 1, culprit)
    assert not out.exists() and not erm.exists()
    # Corrected, the same output directory is accepted (nothing was left to refuse it).
    check = _run([a for a in args if not a.startswith("--init")] + ["--check_only"])
    assert check.returncode == 0, check.stderr[-2000:]


def test_data_error_leaves_no_lock_and_no_run(tmp_path):
    out, erm = tmp_path / "run", tmp_path / "erm"
    refused(TINY + ["--dataset=image_folder", f"--data_dir={tmp_path / 'absent'}",
                    "--test_domains=a", f"--output_dir={out}", f"--erm_cache_dir={erm}"], 1,
            str(tmp_path / "absent"))
    assert not out.exists() and not erm.exists()


def test_non_finite_loss_is_one_message_and_no_checkpoint_of_it(tmp_path):
    # The library test (test_fqat_model) checks that the skipped update keeps a saved
    # checkpoint finite; here the program stops at once with one message and saves nothing
    # from the failed step.
    out = tmp_path / "run"
    proc = refused(TINY + ["--lr=1e38", "--erm_steps=0", "--init=none", "--steps=40",
                           "--eval_every=2", f"--output_dir={out}",
                           f"--erm_cache_dir={tmp_path / 'erm'}"], 1,
                   "non-finite loss or gradient after step 1")
    assert "its last checkpoint (none) is intact" in proc.stderr
    assert (out / rundir.FLAGS_JSON).exists() and not (out / rundir.CHECKPOINTS).exists()


def test_divergence_is_reported(tmp_path):
    out = tmp_path / "run"
    done = _run(TINY + ["--lr=1e6", "--erm_steps=0", "--init=none", "--steps=6", "--eval_every=2",
                        f"--output_dir={out}", f"--erm_cache_dir={tmp_path / 'erm'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = rundir.read_results(str(out))
    # Which sign comes first (loss growth or chance accuracy) depends on the arithmetic.
    assert results["diverged"] is True and results["divergence"]
    assert "the run looks diverged" in done.stdout
    assert json.loads(done.stdout.splitlines()[-1])["diverged"] is True


# --- export.tflite, export.verify, convert_moco ------------------------------------------------

@pytest.mark.parametrize("target", ["model.keras", "results.json", "checkpoints/m.tflite",
                                    "tb/m.tflite"])
def test_export_refuses_an_out_among_a_runs_own_files(finished, target):
    run = finished["out"]
    refused([run, "--out", os.path.join(run, target)], 1,
            f"is one of the files of run directory {run}", folder=run,
            prefix=(sys.executable, "-m", "export.tflite"), prog="export.tflite")


def test_export_names_a_folder_that_is_not_a_run(tmp_path):
    refused([str(tmp_path), "--out", str(tmp_path / "m.tflite")], 1,
            f"{tmp_path}: not a run directory (no model.keras)",
            prefix=(sys.executable, "-m", "export.tflite"), prog="export.tflite")
    assert os.listdir(tmp_path) == []


def test_export_then_verify_a_damaged_file(finished, tmp_path):
    out = tmp_path / "m.tflite"
    done = _run([finished["out"], "--out", str(out)], (sys.executable, "-m", "export.tflite"))
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    # A truncated copy is named by the verifier, not a traceback.
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(out.read_bytes()[:1000])
    refused([str(bad), finished["out"]], 1, "bad.tflite",
            prefix=(sys.executable, "-m", "export.verify"), prog="export.verify")
    refused([str(tmp_path / "absent.tflite"), finished["out"]], 1,
            "absent.tflite: no such .tflite file",
            prefix=(sys.executable, "-m", "export.verify"), prog="export.verify")


def test_convert_moco_names_a_bad_checkpoint_and_writes_nothing(tmp_path):
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a pickle")
    refused(["--checkpoint", str(junk), "--out", str(tmp_path / "r50.weights.h5")], 1,
            "junk.pth.tar", prefix=(sys.executable, "-m", "fqat_tf.models.convert_moco"),
            prog="fqat_tf.models.convert_moco")
    assert sorted(os.listdir(tmp_path)) == ["junk.pth.tar"]
