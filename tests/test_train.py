"""The training program: every experiments/*.cfg in smoke mode, outputs, bad flags (a killed
run's resume is test_reproducible's)."""
import glob
import os
import subprocess
import sys

import keras
import pytest
from absl import app

import fqat_tf
from helpers import parse_train_flags
from fqat_tf import rundir, trainer
from fqat_tf.data import DATASETS
from fqat_tf.data.synthetic import write_image_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "experiments", "*.cfg")))
FOLDERS = {"pacs": "PACS", "office_home": "office_home", "domain_net": "domain_net"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny DomainBed data root with every photo dataset's domains and classes."""
    root = str(tmp_path_factory.mktemp("data"))
    for name, folder in FOLDERS.items():
        info = DATASETS[name]
        classes = info.class_names or tuple(f"class_{i:03d}" for i in range(info.num_classes))
        per_class = 1 if len(classes) > 100 else 3
        write_image_tree(os.path.join(root, folder), info.domains, classes,
                         images_per_class=per_class, size=(8, 8))
    return root


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_experiment_config_runs_in_smoke_mode(cfg, data_root, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    out = os.path.join(base, "runs", os.path.basename(cfg)[:-4])
    settings = parse_train_flags([f"--flagfile={cfg}", "--smoke", f"--data_dir={data_root}",
                       f"--output_dir={out}", f"--erm_cache_dir={base}/erm_cache",
                       "--verbose=0"])
    results = trainer.run(settings)
    assert rundir.is_finished(out)
    assert 0.0 <= results["val_avg"] <= 1.0 and 0.0 <= results["test_avg"] <= 1.0
    assert results["method"] == settings["method"]
    assert set(results["test"]) == set(settings["test_domains"])


def test_quickstart_outputs_exist_and_parse(tmp_path):
    out = str(tmp_path / "qat")
    settings = parse_train_flags(["--flagfile=experiments/quickstart.cfg", "--smoke", f"--output_dir={out}",
                       f"--erm_cache_dir={tmp_path}/erm", "--verbose=0"])
    assert settings["method"] == "fqat" and settings["dataset"] == "rotated_mnist_5k"
    results = trainer.run(settings)
    for name in (rundir.FLAGS_JSON, rundir.MODEL, rundir.RESULTS, rundir.EVALS,
                 rundir.DISORDER_CSV, rundir.DISORDER_PNG, rundir.FREEZE_PNG):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert os.listdir(os.path.join(out, rundir.TENSORBOARD))
    for png in (rundir.DISORDER_PNG, rundir.FREEZE_PNG):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert rundir.read_json(os.path.join(out, rundir.FLAGS_JSON))["steps"] == settings["steps"]
    evals = rundir.read_evals(out)
    assert [r["step"] for r in evals] == list(range(settings["eval_every"], settings["steps"] + 1,
                                                  settings["eval_every"]))
    best = max(evals, key=lambda r: (r["val_avg"], -r["step"]))
    assert results["selected_step"] == best["step"]
    assert results["test_avg"] == best["test_avg"]
    model = keras.saving.load_model(os.path.join(out, rundir.MODEL), safe_mode=True)
    names = [v.path for v in fqat_tf.scale_variables(model)]
    assert sorted(results["final_masks"]) == sorted(names)
    rows = open(os.path.join(out, rundir.DISORDER_CSV)).read().splitlines()
    assert rows[0] == "step,variable,disorder,flat_disorder,mask"
    assert len(rows) - 1 == len(names) * (settings["steps"] // settings["freeze_interval"])
    # The ERM stage ran once and is reused by a second QAT run with the same ERM settings.
    erm_dirs = sorted(os.listdir(tmp_path / "erm"))
    # The lock that parallel runs sharing the stage wait on is inside it, as in every run.
    assert os.path.isfile(tmp_path / "erm" / erm_dirs[0] / rundir.RUN_LOCK)
    assert len(erm_dirs) == 1 and rundir.is_finished(str(tmp_path / "erm" / erm_dirs[0]))
    mtime = os.path.getmtime(tmp_path / "erm" / erm_dirs[0] / rundir.RESULTS)
    again = parse_train_flags(["--flagfile=experiments/quickstart.cfg", "--smoke", "--method=lsq",
                    f"--output_dir={tmp_path}/lsq", f"--erm_cache_dir={tmp_path}/erm",
                    "--verbose=0"])
    trainer.run(again)
    assert sorted(os.listdir(tmp_path / "erm")) == erm_dirs
    assert os.path.getmtime(tmp_path / "erm" / erm_dirs[0] / rundir.RESULTS) == mtime
    # A finished run is not rerun.
    assert trainer.run(settings) == results


def test_parallel_runs_sharing_an_erm_stage_train_it_once(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    erm = str(tmp_path / "erm")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "fqat_tf.train", "--flagfile=experiments/quickstart.cfg",
         "--smoke", f"--method={method}", f"--output_dir={tmp_path / method}",
         f"--erm_cache_dir={erm}", "--verbose=0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for method in ("lsq", "fqat")]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # One of them trained the stage while the other waited on its lock, then reused it.
    assert sum("ERM stage: reusing" in log for log in logs) == 1, logs
    stages = [d for d in os.listdir(erm) if not d.endswith(".lock")]
    assert len(stages) == 1 and rundir.is_finished(os.path.join(erm, stages[0]))
    assert all(rundir.is_finished(str(tmp_path / m)) for m in ("lsq", "fqat"))


@pytest.mark.parametrize("args,flag", [
    (["--weight_bits=9"], "weight_bits"),
    (["--activation_bits=1"], "activation_bits"),
    (["--method=nope"], "method"),
    (["--dataset=imagenet"], "dataset"),
    (["--test_domains=90"], "test_domains"),
    (["--method=erm", "--weight_bits=4"], "weight_bits"),
    (["--method=erm", "--int8_storage"], "int8_storage"),
    (["--method=erm", "--shared_inputs=stored"], "shared_inputs"),
    (["--method=ewgs", "--quantizer=lsq"], "quantizer"),
    (["--freeze_interval=1"], "freeze_interval"),
    (["--freeze_threshold=1.5"], "freeze_threshold"),
    (["--steps=0"], "steps"),
    (["--lr=0"], "lr"),
    (["--init=imagenet21k"], "init"),
    (["--backbone=vgg"], "backbone"),
    (["--image_size=64"], "image_size"),
    (["--eval_after=10", "--steps=10"], "eval_after"),
])
def test_bad_flags_name_the_flag(args, flag):
    with pytest.raises(app.UsageError, match=f"--{flag}"):
        parse_train_flags(args)


def test_bad_flag_exits_non_zero_before_any_work(tmp_path):
    out = tmp_path / "never"
    for args, needle in ((["--weight_bits=12"], "--weight_bits"),
                         (["--no_such_flag=1"], "no_such_flag")):
        proc = subprocess.run([sys.executable, "-m", "fqat_tf.train", *args,
                               f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.returncode != 0
        assert needle in proc.stderr
        assert not out.exists()


def test_output_dir_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    rundir.write_json(os.path.join(out, rundir.FLAGS_JSON), {"method": "lsq", "steps": 3})
    settings = parse_train_flags(["--smoke", "--method=fqat", f"--output_dir={out}",
                       f"--erm_cache_dir={tmp_path}/erm", "--erm_steps=0", "--verbose=0"])
    with pytest.raises(trainer.RunError, match="other settings"):
        trainer.run(settings)


def test_settings_added_later_match_an_older_run_at_their_default(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    settings = parse_train_flags(["--smoke", f"--output_dir={out}"])
    older = {k: v for k, v in settings.items() if k != "calibration_source"}
    rundir.write_json(os.path.join(out, rundir.FLAGS_JSON), older)
    assert trainer.check_settings(settings, out) == "same"
    with pytest.raises(trainer.RunError, match="calibration_source: 'float' there, 'quantized'"):
        trainer.check_settings({**settings, "calibration_source": "quantized"}, out)


def test_method_aliases_resolve():
    s = parse_train_flags(["--method=ewgs_sagm"])
    assert (s["method"], s["quantizer"]) == ("lsq_sagm", "ewgs")
    s = parse_train_flags(["--method=erm"])
    assert s["quantizer"] == "lsq" and s["output_dir"].endswith(os.path.join("0", "seed0"))
