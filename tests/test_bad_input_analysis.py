"""Bad input to the analysis programs, through the real commands: the exit code, one message
naming the culprit, no traceback, and nothing left on disk."""
import json
import os
import subprocess
import sys

import pytest

from fqat_tf import rundir

from test_report import make_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


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
