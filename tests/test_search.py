"""fqat_tf.search: the paper's two-phase search (learning rate, then r x K) through the sweep."""
import itertools
import json
import os

import pytest

from fqat_tf import rundir, search, sweep

from helpers import flagfile, make_run, read_calls

PAPER_4BIT = list(itertools.product(("0.28", "0.3", "0.32"), ("300", "350", "400")))


def _phase1_dir(out, lr, domain, seed, stem="cell"):
    return os.path.join(out, f"{stem}__lr-{lr}__freeze_threshold-0.3__freeze_interval-350",
                        domain, f"seed{seed}")


def _fake_phase1(out, vals):
    """Finished phase-1 runs written by hand: vals maps lr text -> (val seed 0, val seed 1)."""
    for lr, per_seed in vals.items():
        for seed, val in zip((0, 1), per_seed):
            hp = {"lr": float(lr), "freeze_threshold": 0.3, "freeze_interval": 350}
            run = make_run(os.path.join(out, "x"), "y", "photo", seed, val, 0.5, hparams=hp)
            target = _phase1_dir(out, lr, "photo", seed)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(run, target)


def _argv(cfg, out, command, *more):
    return [f"--flagfile={cfg}", f"--sweep_dir={out}", "--seeds=0,1", "--test_domains=photo",
            "--grid=paper", "--search=two_phase", f"--train_command={command}", *more]


def test_phase1_runs_the_flagfiles_own_r_and_k_at_every_lr(tmp_path):
    runs = search.phase1_plan(flagfile(tmp_path), "s", "photo", [0], "paper", command=("t",))
    assert [out for out, _ in runs] == [_phase1_dir("s", lr, "photo", 0)
                                        for lr in ("1e-05", "3e-05", "5e-05")]
    assert runs[0][1][-4:-1] == ["--lr=1e-05", "--freeze_threshold=0.3",
                                 "--freeze_interval=350"]
    with pytest.raises(ValueError, match="may not name lr"):
        search.phase1_plan(flagfile(tmp_path), "s", "photo", [0], "lr=1,2", command=("t",))


def test_dry_run_of_phase2_plans_the_grid_at_the_selected_lr(tmp_path, capsys, fake):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, _ = fake
    # Mean validation: 1e-05 -> 0.75, 3e-05 -> 0.80 (selected), 5e-05 -> 0.78; seed 0 alone
    # would choose 1e-05, so the mean over seeds decides.
    _fake_phase1(out, {"1e-05": (0.90, 0.60), "3e-05": (0.82, 0.78), "5e-05": (0.78, 0.78)})
    assert sweep.main(_argv(cfg, out, command, "--phase=2", "--dry_run")) == 0
    listing = capsys.readouterr().out
    assert "lr 3e-05 selected (mean training-domain validation accuracy: 1e-05: 75.00, " \
           "3e-05: 80.00, 5e-05: 78.00)" in listing
    lines = [line for line in listing.splitlines() if "--output_dir=" in line]
    assert len(lines) == 9 * 2
    assert all("--lr=3e-05" in line for line in lines)
    points = [(line.split("--freeze_threshold=")[1].split()[0],
               line.split("--freeze_interval=")[1].split()[0]) for line in lines]
    assert sorted(set(points)) == sorted(PAPER_4BIT) and len(set(points)) == 9
    # Phase 1's run at the selected lr is phase 2's (r, K) = (0.3, 350): already finished.
    finished = [line for line in lines if line.startswith("[finished]")]
    assert len(finished) == 2 and all("--freeze_threshold=0.3 --freeze_interval=350" in line
                                      for line in finished)
    assert not os.path.exists(os.path.join(out, search.SEARCH_JSON))  # a dry run writes none


def test_phase2_refuses_an_unfinished_phase1_naming_the_runs(tmp_path, capsys, fake):
    cfg, out = flagfile(tmp_path), str(tmp_path / "sweep")
    command, _ = fake
    _fake_phase1(out, {"1e-05": (0.7, 0.7), "3e-05": (0.8, 0.8), "5e-05": (0.7, 0.7)})
    missing = _phase1_dir(out, "5e-05", "photo", 1)
    os.remove(os.path.join(missing, rundir.RESULTS))
    assert sweep.main(_argv(cfg, out, command, "--phase=2", "--dry_run")) == 1
    err = capsys.readouterr().err
    assert "phase 1 is not finished: 1 of 6 runs" in err and missing in err
    # With both phases the dry run lists phase 1 and marks phase 2 pending.
    assert sweep.main(_argv(cfg, out, command, "--dry_run")) == 0
    listing = capsys.readouterr().out
    assert "phase 1: 6 runs planned" in listing and "phase 2: pending phase 1" in listing


def test_both_phases_run_and_share_the_common_run(tmp_path, capsys, fake):
    fqat = flagfile(tmp_path, name="m_w4.cfg")
    lsq = flagfile(tmp_path, name="m_w4_lsq.cfg", method="lsq")
    out = str(tmp_path / "sweep")
    command, log = fake
    argv = [f"--flagfile={fqat}", f"--flagfile={lsq}", f"--sweep_dir={out}", "--seeds=0",
            "--test_domains=photo", "--grid=paper", "--search=two_phase",
            f"--train_command={command}", "--", f"--calls_log={log}"]
    assert sweep.main(argv) == 0
    calls = [c["argv"] for c in read_calls(log)]
    # Phase 1: 3 lrs for each flagfile; phase 2: 9 FQAT points at 3e-05, one of them phase
    # 1's; LSQ's phase 2 is its phase-1 run at 3e-05.
    assert len(calls) == 3 + 3 + 8
    phase2 = calls[6:]
    assert all("--lr=3e-05" in c for c in phase2)
    assert sorted((c[-3].split("=")[1], c[-2].split("=")[1]) for c in phase2) == sorted(
        p for p in PAPER_4BIT if p != ("0.3", "350"))
    record = rundir.read_json(os.path.join(out, search.SEARCH_JSON))
    assert [f["selected_lr"] for f in record["flagfiles"]] == [3e-05, 3e-05]
    assert len(record["flagfiles"][0]["settings"]) == 9
    assert record["flagfiles"][1]["settings"] == [os.path.join(out, "m_w4_lsq__lr-3e-05")]
    text = capsys.readouterr().out
    assert "phase 2: 8 done, 2 skipped (already finished), 0 failed, 0 conflict" in text
    assert "python -m fqat_tf.report" in text and "m_w4_lsq__lr-3e-05" in text
    manifest = rundir.read_json(os.path.join(out, search.PHASE_MANIFESTS["1"]))
    assert len(manifest["done"]) == 6
    # A second invocation has nothing left to do.
    assert sweep.main(argv) == 0 and len(read_calls(log)) == 14
    assert json.loads(open(os.path.join(out, search.SEARCH_JSON)).read()) == record
