"""The catalogue of bad input, through the real commands: the exit code, one message that names
the culprit, no traceback, and what is left on disk (nothing, or the run untouched).

Sections: the training program; bad image trees; the analysis programs (sweep, report, plots,
landscape, scale_sensitivity); export.tflite, export.verify and convert_moco.
"""
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

from fqat_tf import rundir, train, trainer
from fqat_tf.data.synthetic import write_image_tree
from helpers import make_run, parse_train_flags

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

# --- bad image trees -----------------------------------------------------------------------

def _symlink_loop(tree, tmp_path):
    link = os.path.join(tree, "d_a", "cat", "again")
    os.symlink(os.path.join("..", ".."), link)
    return link


def _symlink_out_of_the_root(tree, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(open(os.path.join(tree, "d_a", "cat", "0000.png"), "rb").read())
    link = os.path.join(tree, "d_b", "dog", "outside.png")
    os.symlink(str(outside), link)
    return link


def _name_not_utf8(tree, tmp_path):
    path = os.path.join(os.fsencode(tree), b"d_c", b"cat", b"\xff.png")
    with open(path, "wb") as f:
        f.write(open(os.path.join(tree, "d_a", "cat", "0000.png"), "rb").read())
    return repr(path)


def _truncated_jpeg(tree, tmp_path):
    path = os.path.join(tree, "d_b", "cat", "0001.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("spoil", [_symlink_loop, _symlink_out_of_the_root, _name_not_utf8,
                                   _truncated_jpeg], ids=lambda f: f.__name__.strip("_"))
def test_a_bad_tree_stops_the_program_with_the_culprit_named(tmp_path, spoil):
    tree = str(tmp_path / "tree")
    write_image_tree(tree, ["d_a", "d_b", "d_c"], ["cat", "dog"], images_per_class=3,
                     formats=("png", "jpg"))
    culprit = spoil(tree, tmp_path)
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fqat_tf.train", "--dataset=image_folder", f"--data_dir={tree}",
         "--test_domains=d_c", "--method=erm", "--smoke", "--verbose=0",
         f"--output_dir={output_dir}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert culprit in result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists() or not any(output_dir.iterdir())

# --- the analysis programs -------------------------------------------------------------------

def _refused(tmp_path, module, args, code, culprit, env=None):
    """Runs `python -m fqat_tf.<module> args`; checks the refusal and that no file appeared."""
    before = _files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", f"fqat_tf.{module}", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith(f"fqat_tf.{module}") and ": error: " in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert culprit in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    if code == 2:
        assert "run with --help for usage" in proc.stderr
    assert _files(tmp_path) == before


def _flagfile(tmp_path, method="fqat"):
    cfg = tmp_path / f"{method}.cfg"
    cfg.write_text(f"--dataset=pacs\n--method={method}\n--weight_bits=4\n"
                   f"--freeze_interval=350\n")
    return str(cfg)


def _fake_nvidia_smi(tmp_path, listing, status=0):
    bin_dir = tmp_path.parent / f"{tmp_path.name}_bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\nexit {status}\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# --- fqat_tf.sweep -------------------------------------------------------------------------

def test_sweep_missing_flagfile(tmp_path):
    absent = str(tmp_path / "absent.cfg")
    _refused(tmp_path, "sweep", [f"--flagfile={absent}", f"--sweep_dir={tmp_path / 's'}"], 1,
             f"--flagfile={absent}: no such file")


@pytest.mark.parametrize("flag, culprit", [("--grid=K", "--grid part 'K'"),
                                           ("--seeds=a", "--seeds=a"),
                                           ("--phase=2", "--phase needs --search")])
def test_sweep_usage_errors(tmp_path, flag, culprit):
    _refused(tmp_path, "sweep", [f"--flagfile={_flagfile(tmp_path)}",
                                 f"--sweep_dir={tmp_path / 's'}", flag], 2, culprit)


def test_sweep_unknown_test_domain(tmp_path):
    _refused(tmp_path, "sweep", [f"--flagfile={_flagfile(tmp_path)}", "--test_domains=drawing",
                                 f"--sweep_dir={tmp_path / 's'}"], 1,
             "unknown test domain 'drawing'")


def test_sweep_names_a_gpu_the_machine_lacks(tmp_path):
    env = _fake_nvidia_smi(tmp_path, "GPU 0: A (UUID: x)\nGPU 1: A (UUID: y)\n")
    _refused(tmp_path, "sweep", [f"--flagfile={_flagfile(tmp_path)}", "--devices=0,7",
                                 f"--sweep_dir={tmp_path / 's'}"], 1,
             "--devices=0,7: no GPU 7 on this machine (it has 0, 1)", env)


def test_sweep_all_devices_without_a_gpu(tmp_path):
    # nvidia-smi fails as it does without a driver; TensorFlow (asked in a child) sees none.
    env = _fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", status=9)
    _refused(tmp_path, "sweep", [f"--flagfile={_flagfile(tmp_path)}", "--devices=all",
                                 f"--sweep_dir={tmp_path / 's'}"], 1,
             "--devices=all: no GPU found", dict(env, CUDA_VISIBLE_DEVICES=""))


def test_sweep_phase2_before_phase1(tmp_path):
    _refused(tmp_path, "sweep", [f"--flagfile={_flagfile(tmp_path)}", "--test_domains=photo",
                                 "--seeds=0", "--grid=paper", "--search=two_phase",
                                 "--phase=2", f"--sweep_dir={tmp_path / 's'}"], 1,
             "phase 1 is not finished: 3 of 3 runs have no results.json: "
             f"{tmp_path / 's'}/fqat__lr-1e-05__freeze_threshold-0.3__freeze_interval-350/photo")


# --- fqat_tf.report ------------------------------------------------------------------------

def test_report_missing_root(tmp_path):
    _refused(tmp_path, "report", [str(tmp_path / "absent")], 1, "absent: not a folder")


def test_report_root_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, "report", [str(tmp_path / "empty")], 1, "empty: no finished run")


def test_report_bad_split(tmp_path):
    make_run(tmp_path, "fqat", "photo", 0, 0.8, 0.5)
    _refused(tmp_path, "report", [str(tmp_path), "--split=both"], 2,
             "argument --split: invalid choice: 'both'")


def test_report_heatmap_without_baseline(tmp_path):
    make_run(tmp_path, "fqat", "photo", 0, 0.8, 0.5)
    _refused(tmp_path, "report", [str(tmp_path), "--heatmap", str(tmp_path / "fig6.png"),
                                  "--out", str(tmp_path / "table.md")], 1,
             "no lsq_sagm baseline at W4/A4 (lsq)")


def test_report_broken_results(tmp_path):
    broken = tmp_path / "run" / rundir.RESULTS
    broken.parent.mkdir()
    broken.write_text("{not json")
    _refused(tmp_path, "report", [str(tmp_path)], 1, f"{broken}: damaged, not valid JSON")


# --- fqat_tf.plots -------------------------------------------------------------------------

def _plain_run(tmp_path, name, seed=0, gradients="step,variable,g_va,g_flat,applied\n5,s,1,1,1\n"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / rundir.FLAGS_JSON).write_text(json.dumps({"seed": seed, "method": "fqat"}))
    if gradients is not None:
        (run_dir / rundir.GRADIENTS_CSV).write_text(gradients)
    return str(run_dir)


def test_plots_missing_run(tmp_path):
    _refused(tmp_path, "plots", ["run", str(tmp_path / "absent")], 1,
             "absent: no such run directory")


def test_plots_run_without_csvs(tmp_path):
    run_dir = _plain_run(tmp_path, "run", gradients=None)
    _refused(tmp_path, "plots", ["run", run_dir], 1,
             "neither disorder.csv nor gradients.csv; nothing to plot")


def test_plots_empty_gradients_write_no_plot(tmp_path):
    run_dir = _plain_run(tmp_path, "run", gradients="step,variable,g_va,g_flat,applied\n")
    with open(os.path.join(run_dir, rundir.DISORDER_CSV), "w") as f:
        f.write("step,variable,disorder,mask\n5,s,0.5,1\n")
    _refused(tmp_path, "plots", ["run", run_dir], 1, "gradients.csv: no rows")


def test_plots_compare_other_seeds(tmp_path):
    a, b = _plain_run(tmp_path, "fqat"), _plain_run(tmp_path, "twin", seed=23)
    _refused(tmp_path, "plots", ["compare", a, b, "--out", str(tmp_path / "fig4.png")], 1,
             f"{b}: seed 23 differs from seed 0")


def test_plots_compare_without_out(tmp_path):
    a, b = _plain_run(tmp_path, "fqat"), _plain_run(tmp_path, "twin")
    _refused(tmp_path, "plots", ["compare", a, b], 2, "required: --out")


# --- fqat_tf.landscape ---------------------------------------------------------------------

def test_landscape_missing_run(tmp_path):
    _refused(tmp_path, "landscape", [str(tmp_path / "absent")], 1,
             "absent: no such run directory")


def test_landscape_even_grid(tmp_path):
    _refused(tmp_path, "landscape", [str(tmp_path), "--grid=4"], 2, "expected an odd int >= 3")


def test_landscape_several_runs_need_out(tmp_path):
    _refused(tmp_path, "landscape", [str(tmp_path / "a"), str(tmp_path / "b")], 2,
             "several RUN_DIRs need --out")


# --- fqat_tf.scale_sensitivity -------------------------------------------------------------

@pytest.mark.parametrize("factors, culprit", [("0.9,0", "'0' must be a number > 0"),
                                              ("0.9,-0.5", "'-0.5' must be a number > 0"),
                                              ("abc", "'abc' is not a number")])
def test_sensitivity_bad_factors(tmp_path, factors, culprit):
    run_dir = make_run(tmp_path, "fqat", "photo", 0, 0.8, 0.5)
    _refused(tmp_path, "scale_sensitivity", [run_dir, f"--factors={factors}"], 2, culprit)


def test_sensitivity_float_run(tmp_path):
    run_dir = make_run(tmp_path, "erm", "photo", 0, 0.8, 0.5, method="erm")
    with open(os.path.join(run_dir, rundir.FLAGS_JSON), "w") as f:
        json.dump({"method": "erm"}, f)
    _refused(tmp_path, "scale_sensitivity", [run_dir], 1,
             "a full-precision run (method erm) has no scale factors")


def test_sensitivity_missing_run(tmp_path):
    _refused(tmp_path, "scale_sensitivity", [str(tmp_path / "absent")], 1,
             "absent: no such run directory")


def test_sensitivity_unfinished_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.FLAGS_JSON).write_text(json.dumps({"method": "fqat"}))
    _refused(tmp_path, "scale_sensitivity", [str(run_dir)], 1,
             f"{run_dir}: not a finished run (no results.json)")


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
