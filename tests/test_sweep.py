"""fqat_tf.sweep: the run list, flag order and checks, and an end-to-end sweep of a stand-in."""
import itertools
import os
import shlex
import subprocess

import pytest

from fqat_tf import devices, launch, rundir, sweep
from fqat_tf.data import registry
from helpers import PACS, flagfile, read_calls

GRID = "freeze_threshold=0.28,0.30,0.32;freeze_interval=300,350,400"


def test_plan_crosses_domains_seeds_and_grid(tmp_path):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    runs = sweep.plan(cfg, out, seeds=(0, 23), grid=GRID, extra_flags=["--smoke"],
                      command=("train",))
    assert len(runs) == 3 * 3 * 4 * 2 and len({d for d, _ in runs}) == len(runs)
    first_dir, first_argv = runs[0]
    assert first_dir == os.path.join(out, "cell__freeze_threshold-0.28__freeze_interval-300",
                                     "art_painting", "seed0")
    # Extras override the flagfile; the sweep's own flags come last, so nothing overrides them.
    assert first_argv == ["train", f"--flagfile={cfg}", "--smoke",
                          f"--erm_cache_dir={os.path.join(out, 'erm_cache')}",
                          "--test_domains=art_painting",
                          "--seed=0", "--freeze_threshold=0.28", "--freeze_interval=300",
                          f"--output_dir={first_dir}"]
    got = {tuple(a.split("=", 1)[1] for a in argv[4:8]) for _, argv in runs}
    assert got == set(itertools.product(PACS, ("0", "23"), ("0.28", "0.30", "0.32"),
                                        ("300", "350", "400")))


def test_plan_without_grid_and_with_domain_groups(tmp_path):
    runs = sweep.plan(flagfile(tmp_path, "domain_net"), "s", seeds=[1], command=("t",))
    assert [d for d, _ in runs] == [os.path.join("s", "cell", g, "seed1") for g in
                                    ("clipart+infograph", "painting+quickdraw", "real+sketch")]
    assert runs[0][1][2] == f"--erm_cache_dir={os.path.join('s', 'erm_cache')}"
    assert runs[0][1][3] == "--test_domains=clipart,infograph"
    custom = sweep.plan(flagfile(tmp_path, "domain_net"), "s", "quickdraw+painting,real",
                        seeds=[0], command=("t",))
    assert [argv[3] for _, argv in custom] == ["--test_domains=painting,quickdraw",
                                                "--test_domains=real"]
    office = sweep.plan(flagfile(tmp_path, "office_home"), "s", "real world", [0],
                        command=("t",))
    assert office[0][0] == os.path.join("s", "cell", "Real_World", "seed0")
    assert office[0][1][3] == "--test_domains=Real World"


def test_paper_grid_follows_dataset_and_bits(tmp_path):
    runs = sweep.plan(flagfile(tmp_path, "pacs", 3), "s", "sketch", [0], grid="paper",
                      command=("t",))
    assert [argv[-3:-1] for _, argv in runs][:3] == [
        ["--freeze_threshold=0.28", "--freeze_interval=100"],
        ["--freeze_threshold=0.28", "--freeze_interval=150"],
        ["--freeze_threshold=0.28", "--freeze_interval=200"]]
    assert len(runs) == 9
    assert sweep.paper_grid("domain_net", 8) == {"freeze_threshold": ["0.3", "0.35"],
                                                 "freeze_interval": ["1500", "2000"]}
    assert sweep.paper_grid("office_home", "5")["freeze_interval"] == ["300", "350", "400"]
    with pytest.raises(ValueError, match="no freeze grid for pacs at 6 weight bits"):
        sweep.paper_grid("pacs", 6)


@pytest.mark.parametrize("method, points", [
    ("fqat", 4), ("no_unfreeze", 4), ("reverse", 4), ("freeze_both", 4),
    ("lsq", 1), ("lsq_sagm", 1), ("alter", 1), ("ewgs", 1), ("ewgs_sagm", 1), ("erm", 1)])
def test_paper_grid_only_grids_methods_that_freeze(tmp_path, method, points):
    cfg = flagfile(tmp_path, "rotated_mnist_5k", 3, method=method)
    runs = sweep.plan(cfg, "s", "75", [0], grid="paper", command=("t",))
    assert len(runs) == points
    grid_flags = [a for _, argv in runs for a in argv if a.startswith("--freeze_")]
    if points == 1:
        assert not grid_flags and runs[0][0] == os.path.join("s", "cell", "75", "seed0")
    else:
        assert sorted(grid_flags) == sorted(
            f"--freeze_{n}={v}" for n, vs in (("threshold", ("0.25", "0.35")),
                                              ("interval", ("10", "25")))
            for v in vs for _ in range(2))


def test_paper_grid_rejects_an_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="cell.cfg: unknown method 'sgd'"):
        sweep.plan(flagfile(tmp_path, method="sgd"), "s", grid="paper", command=("t",))


def test_expand_flagfiles_globs_keeps_order_and_names_misses(tmp_path):
    a = flagfile(tmp_path, name="a_w4.cfg")
    b = flagfile(tmp_path, name="a_w3.cfg")
    c = flagfile(tmp_path, name="c.cfg")
    assert sweep.expand_flagfiles([c, str(tmp_path / "a_*.cfg")]) == [c, b, a]
    assert sweep.expand_flagfiles([a, str(tmp_path / "a_w?.cfg")]) == [a, b]
    with pytest.raises(FileNotFoundError, match=r"--flagfile=.*zz_\*.cfg: no such file"):
        sweep.expand_flagfiles([str(tmp_path / "zz_*.cfg")])
    with pytest.raises(FileNotFoundError, match="missing.cfg: no such file"):
        sweep.expand_flagfiles([str(tmp_path / "missing.cfg")])
    os.makedirs(tmp_path / "other")
    twin = flagfile(tmp_path / "other", name="c.cfg")
    with pytest.raises(ValueError, match=r"several flagfiles named \['c'\]"):
        sweep.expand_flagfiles([c, twin])


def test_cli_runs_every_flagfile_of_a_glob(tmp_path, capsys):
    flagfile(tmp_path, name="m_w4.cfg", method="fqat")
    flagfile(tmp_path, name="m_w4_lsq.cfg", method="lsq")
    flagfile(tmp_path, name="m_w3_lsq.cfg", method="lsq")
    argv = [f"--flagfile={tmp_path / 'm_*.cfg'}", f"--sweep_dir={tmp_path / 's'}",
            "--test_domains=photo", "--seeds=0,1", "--grid=paper", "--dry_run"]
    assert sweep.main(argv) == 0
    listing = capsys.readouterr().out
    # fqat at 4 bits: 3 x 3 paper points x 2 seeds; each lsq file: 2 seeds.
    assert "22 runs planned" in listing
    order = [line.split("--output_dir=")[1].split(os.sep)[-3] for line in listing.splitlines()
             if "--output_dir=" in line]
    assert order[0] == "m_w3_lsq" and order[2].startswith("m_w4__") and order[-1] == "m_w4_lsq"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"grid": "freeze_threshold"}, ValueError, "expected name=value1"),
    ({"grid": "lr=1e-5,"}, ValueError, "empty value"),
    ({"grid": "lr=1;lr=2"}, ValueError, "names 'lr' twice"),
    ({"grid": "seed=1,2"}, ValueError, "may not set 'seed'"),
    ({"extra_flags": ["--seed=3"]}, ValueError, "set by the sweep"),
    ({"extra_flags": ["--output_dir=x"]}, ValueError, "set by the sweep"),
    ({"extra_flags": ["steps", "10"]}, ValueError, "as --name=value"),
    ({"grid": "lr=1,2", "extra_flags": ["--lr=3"]}, ValueError, r"\['lr'\] set both"),
    ({"test_domains": "drawing"}, registry.DataError, "unknown test domain 'drawing'"),
    ({"test_domains": "sketch,photo+sketch"}, registry.DataError, "repeated domain"),
    ({"seeds": [0, 0]}, ValueError, "each once"),
])
def test_bad_arguments_name_the_culprit(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        sweep.plan(flagfile(tmp_path), "s", command=("t",), **kwargs)


def test_bad_flagfiles(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.cfg: no such file"):
        sweep.plan(str(tmp_path / "absent.cfg"), "s")
    (tmp_path / "nodata.cfg").write_text("--method=fqat\n")
    with pytest.raises(ValueError, match="sets no --dataset"):
        sweep.plan(str(tmp_path / "nodata.cfg"), "s")
    (tmp_path / "broken.cfg").write_text(f"--flagfile={tmp_path / 'gone.cfg'}\n")
    with pytest.raises(FileNotFoundError, match="gone.cfg"):
        sweep.plan(str(tmp_path / "broken.cfg"), "s")


def test_sweep_runs_skips_finished_and_reports_failures(tmp_path, capsys, fake):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, log = fake
    finished = os.path.join(out, "cell", "art_painting", "seed0")
    rundir.write_json(os.path.join(finished, rundir.RESULTS), {"seed": 0})
    argv = [f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0,1",
            f"--train_command={command}", "--", f"--calls_log={log}", "--fail_seed=1"]

    assert sweep.main(argv) == 1
    calls = read_calls(log)
    assert len(calls) == 7  # 4 domains x 2 seeds, less the finished run
    assert all(f"--calls_log={log}" in c["argv"] and "--fail_seed=1" in c["argv"]
               for c in calls)
    assert all(c["cuda"] is None for c in calls)  # no --devices: the environment is untouched
    summary = capsys.readouterr().out
    assert "3 done, 1 skipped (already finished), 4 failed, 0 conflict" in summary
    assert all(rundir.is_finished(os.path.join(out, "cell", d, "seed0")) for d in PACS)
    assert not rundir.is_finished(os.path.join(out, "cell", "sketch", "seed1"))
    manifest = rundir.read_json(os.path.join(out, launch.SWEEP_JSON))
    assert len(manifest["runs"]) == 8 and len(manifest["failed"]) == 4
    assert os.path.isfile(os.path.join(out, launch.LOGS, "cell__sketch__seed1.log"))

    # Rerunning the same sweep runs only what is not finished, two at a time.
    argv[-1] = "--fail_seed=none"
    assert sweep.main(argv[:3] + ["--parallel=2"] + argv[3:]) == 0
    rerun = read_calls(log)[7:]
    assert sorted(c["argv"][-1] for c in rerun) == sorted(
        f"--output_dir={os.path.join(out, 'cell', d, 'seed1')}" for d in PACS)
    assert "4 done, 4 skipped (already finished), 0 failed" in capsys.readouterr().out

    assert sweep.main(argv[:3] + ["--dry_run"] + argv[3:]) == 0
    listing = capsys.readouterr().out
    assert listing.count("[finished]") == 8 and "8 runs planned, 0 conflict" in listing
    assert len(read_calls(log)) == 11


def test_other_settings_in_a_run_directory_are_a_conflict(tmp_path, capsys, fake):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, log = fake
    argv = [f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0", "--test_domains=photo,sketch",
            f"--train_command={command}", "--", f"--calls_log={log}", "--steps=10"]
    assert sweep.main(argv) == 0
    capsys.readouterr()
    before = (tmp_path / "sweep" / "cell" / "photo" / "seed0" / rundir.RESULTS).read_text()

    argv[-1] = "--steps=20"   # the same folders, other settings
    assert sweep.main(argv) == 1
    captured = capsys.readouterr()
    assert "0 done, 0 skipped (already finished), 0 failed, 2 conflict" in captured.out
    assert "skipped (already finished)" not in captured.out.replace("0 skipped", "")
    assert "[CONFLICT]" in captured.err and "other settings (steps)" in captured.err
    manifest = rundir.read_json(os.path.join(out, launch.SWEEP_JSON))
    assert sorted(manifest["conflict"]) == sorted(
        os.path.join(out, "cell", d, "seed0") for d in ("photo", "sketch"))
    assert "(steps)" in manifest["conflict_details"][manifest["conflict"][0]]
    assert len(read_calls(log)) == 2  # nothing rerun, and the old results are left alone
    assert (tmp_path / "sweep" / "cell" / "photo" / "seed0" / rundir.RESULTS).read_text() \
        == before

    # The same in a dry run and in the commands launcher: reported, never listed as finished.
    assert sweep.main(argv[:4] + ["--dry_run"] + argv[4:]) == 1
    assert capsys.readouterr().out.count("[conflict]") == 2
    assert sweep.main(argv[:4] + ["--launcher=commands"] + argv[4:]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "0 to run, 0 finished (no command), 2 conflict" in captured.err


def test_commands_launcher_prints_one_line_per_unfinished_run(tmp_path, capsys, fake):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, log = fake
    base = [f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0", f"--train_command={command}"]
    extra = ["--", f"--calls_log={log}"]
    assert sweep.main(base + ["--test_domains=photo"] + extra) == 0
    capsys.readouterr()
    assert sweep.main(base + ["--launcher=commands"] + extra) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # 4 domains, photo finished
    assert all(line.startswith(f"cd {shlex.quote(os.getcwd())} && env ") for line in lines)
    assert all("TF_FORCE_GPU_ALLOW_GROWTH=true" in line and "CUDA_VISIBLE_DEVICES" not in line
               for line in lines)
    assert not any("photo" in line for line in lines)
    assert len(read_calls(log)) == 1  # nothing started
    assert not os.path.exists(os.path.join(out, launch.LOGS, "cell__sketch__seed0.log"))
    # A printed line runs by itself in a fresh shell.
    sketch = next(line for line in lines if "--test_domains=sketch" in line)
    subprocess.run(["bash", "-c", sketch], check=True, cwd="/", timeout=120)
    assert rundir.is_finished(os.path.join(out, "cell", "sketch", "seed0"))
    assert read_calls(log)[-1]["growth"] == "true"
    assert sweep.main(base + ["--launcher=commands"] + extra) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def _fake_gpus(tmp_path, monkeypatch, count):
    """Puts an `nvidia-smi` listing `count` GPUs first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i:04d})\n" for i in range(count))
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_one_run_per_gpu_at_a_time(tmp_path, capsys, fake, monkeypatch):
    _fake_gpus(tmp_path, monkeypatch, 4)
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, log = fake
    assert sweep.main([f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0,1",
                       "--devices=0,1,2,3", f"--train_command={command}", "--",
                       f"--calls_log={log}", "--sleep=0.6"]) == 0
    calls = read_calls(log)
    assert len(calls) == 8
    assert {c["cuda"] for c in calls} == {"0", "1", "2", "3"}
    assert all(c["growth"] == "true" for c in calls)
    assert not any("--strategy=mirrored" in c["argv"] for c in calls)
    for gpu in "0123":
        spans = sorted((c["start"], c["end"]) for c in calls if c["cuda"] == gpu)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert "on GPU" in capsys.readouterr().out


def test_two_gpus_per_run_are_mirrored(tmp_path, fake, monkeypatch):
    _fake_gpus(tmp_path, monkeypatch, 4)
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, log = fake
    assert sweep.main([f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0",
                       "--devices=all", "--gpus_per_run=2", f"--train_command={command}", "--",
                       f"--calls_log={log}", "--sleep=0.3"]) == 0
    calls = read_calls(log)
    assert len(calls) == 4 and {c["cuda"] for c in calls} == {"0,1", "2,3"}
    assert all("--strategy=mirrored" in c["argv"] for c in calls)


def test_device_groups_are_checked_against_the_machine():
    assert devices.device_groups("1,3", 1, available=["0", "1", "2", "3"]) == [("1",), ("3",)]
    assert devices.device_groups("all", 2, available=["0", "1", "2", "3"]) == [
        ("0", "1"), ("2", "3")]
    with pytest.raises(devices.DeviceError, match="no GPU 4 on this machine .it has 0, 1."):
        devices.device_groups("0,4", 1, available=["0", "1"])
    with pytest.raises(devices.DeviceError, match="3 GPU.s. do not split into groups of"):
        devices.device_groups("0,1,2", 2, available=["0", "1", "2"])
    with pytest.raises(devices.DeviceError, match="'x' is not a GPU index"):
        devices.device_groups("0,x", 1, available=["0"])
    with pytest.raises(devices.DeviceError, match="--devices=all: no GPU found"):
        devices.device_groups("all", 1, available=[])
    env = devices.child_env(("2", "3"), base={"HOME": "/h"})
    assert env == {"HOME": "/h", "CUDA_VISIBLE_DEVICES": "2,3",
                   "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    cfg = flagfile(tmp_path)
    for bad, match in (("--grid=K", "--grid part 'K'"), ("--parallel=0", "--parallel=0"),
                       ("--phase=2", "--phase needs --search")):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main([f"--flagfile={cfg}", "--sweep_dir=s", bad])
        assert exit_info.value.code == 2 and match in capsys.readouterr().err
