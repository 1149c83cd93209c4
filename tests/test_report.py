"""fqat_tf.report on synthetic run directories with hand-computed means and stds."""
import csv
import io
import json
import os

import numpy as np
import pytest

from fqat_tf import report, rundir
from helpers import FQAT_HP, PACS, make_run


# Seed 0 and seed 23 accuracies per domain: (val_avg, test).
TABLE = {"art_painting": ((0.80, 0.40), (0.84, 0.44)), "cartoon": ((0.70, 0.50), (0.72, 0.56)),
         "photo": ((0.90, 0.60), (0.90, 0.62)), "sketch": ((0.60, 0.70), (0.66, 0.66))}


def _pacs_sweep(root, name="fqat", method="fqat", hparams=None, shift=0.0):
    for domain, per_seed in TABLE.items():
        for seed, (val, test) in zip((0, 23), per_seed):
            make_run(root, name, domain, seed, val + shift, test + shift, method, hparams=hparams)


def test_cells_are_mean_and_population_std_over_seeds(tmp_path):
    _pacs_sweep(tmp_path)
    (row,) = report.aggregate(report.find_runs([str(tmp_path)]))
    assert row["columns"] == list(PACS) and row["seeds"] == [0, 23] and row["runs"] == 8
    art, sketch = row["cells"]["art_painting"], row["cells"]["sketch"]
    # (80 + 84) / 2 = 82, population std = |84 - 80| / 2 = 2 (the sample std would be 2.83).
    assert art["val"] == pytest.approx({"mean": 82.0, "err": 2.0, "n": 2})
    assert art["test"] == pytest.approx({"mean": 42.0, "err": 2.0, "n": 2})
    assert sketch["test"] == pytest.approx({"mean": 68.0, "err": 2.0, "n": 2})
    # Avg: per-seed averages val (80+70+90+60)/4 = 75 and (84+72+90+66)/4 = 78 -> 76.5 +- 1.5;
    # test (40+50+60+70)/4 = 55 and (44+56+62+66)/4 = 57 -> 56 +- 1.
    assert row["avg"]["val"] == pytest.approx({"mean": 76.5, "err": 1.5, "n": 2})
    assert row["avg"]["test"] == pytest.approx({"mean": 56.0, "err": 1.0, "n": 2})
    text = report.to_markdown([row])
    assert "| fqat (lsq) | 4/4 | 82.00 ± 2.00 | 42.00 ± 2.00 |" in text
    assert "76.50 ± 1.50 | 56.00 ± 1.00 | 0, 23 |" in text
    assert "population standard deviation over seeds (numpy ddof=0)" in text
    assert "best training-domain validation accuracy" in text


def test_standard_error_and_the_papers_avg_convention(tmp_path):
    _pacs_sweep(tmp_path)
    runs = report.find_runs([str(tmp_path)])
    (sem,) = report.aggregate(runs, error="sem")
    assert sem["cells"]["art_painting"]["val"]["err"] == pytest.approx(2.0 / np.sqrt(2))
    (paper,) = report.aggregate(runs, avg_std="domains")
    # Column test stds: 2, 3, 1, 2 -> their mean 2; column test means 42, 53, 61, 68 -> 56.
    assert paper["avg"]["test"] == pytest.approx({"mean": 56.0, "err": 2.0, "n": 2})
    assert "mean of the column errors" in report.to_markdown([paper])


def test_grouping_by_method_bits_and_hparams(tmp_path):
    _pacs_sweep(tmp_path, "fqat_r30")
    _pacs_sweep(tmp_path, "fqat_r28", hparams=dict(FQAT_HP, freeze_threshold=0.28), shift=0.01)
    _pacs_sweep(tmp_path, "lsq", method="lsq", hparams={"lr": 3e-5}, shift=-0.05)
    make_run(tmp_path, "erm", "art_painting", 0, 0.95, 0.80, method="erm", hparams={"lr": 5e-5})
    make_run(tmp_path, "w5", "art_painting", 0, 0.90, 0.45, bits=5)
    rows = report.aggregate(report.find_runs([str(tmp_path)]))
    labels = [(r["label"], report._bits(r)) for r in rows]
    assert labels == [("erm", "Full"), ("lsq (lsq)", "4/4"),
                      ("fqat (lsq) [freeze_threshold=0.28]", "4/4"),
                      ("fqat (lsq) [freeze_threshold=0.3]", "4/4"), ("fqat (lsq)", "5/5")]
    r28 = rows[2]
    assert r28["cells"]["art_painting"]["val"]["mean"] == pytest.approx(83.0)
    erm = rows[0]
    assert erm["cells"]["art_painting"]["test"] == pytest.approx({"mean": 80.0, "err": 0.0,
                                                                  "n": 1})
    assert erm["cells"]["sketch"]["val"] is None and erm["avg"]["val"] is None
    assert "| erm | Full | 95.00 ± 0.00 | 80.00 ± 0.00 | - | - |" in report.to_markdown(rows)


def test_select_hparams_uses_validation_never_test(tmp_path):
    good_val = dict(FQAT_HP, freeze_interval=300)
    good_test = dict(FQAT_HP, freeze_interval=400)
    for domain in PACS:
        for seed in (0, 23):
            # The setting best on validation is worse on test: selection must ignore test.
            make_run(tmp_path, "k300", domain, seed, 0.80, 0.50, hparams=good_val)
            make_run(tmp_path, "k400", domain, seed, 0.70, 0.90, hparams=good_test)
    # On sketch the other setting wins on validation.
    for seed in (0, 23):
        make_run(tmp_path, "k400", "sketch", seed, 0.85, 0.30, hparams=good_test)
    (row,) = report.aggregate(report.find_runs([str(tmp_path)]), select_hparams=True)
    assert row["hparams"]["art_painting"]["freeze_interval"] == 300
    assert row["hparams"]["sketch"]["freeze_interval"] == 400
    assert row["cells"]["art_painting"]["test"]["mean"] == pytest.approx(50.0)
    assert row["cells"]["sketch"]["test"]["mean"] == pytest.approx(30.0)
    assert row["cells"]["sketch"]["val"]["mean"] == pytest.approx(85.0)
    text = report.to_markdown([row])
    assert "test accuracy never used" in text
    assert "fqat (lsq) 4/4, sketch: freeze_interval=400" in text


def test_domainnet_groups_fill_both_columns(tmp_path):
    groups = (("clipart", "infograph"), ("painting", "quickdraw"), ("real", "sketch"))
    for i, group in enumerate(groups):
        for seed in (0, 23):
            make_run(tmp_path, "fqat", group, seed, 0.60 + 0.01 * i,
                     (0.50 + 0.02 * seed / 23, 0.10 + 0.01 * i), dataset="domain_net")
    (row,) = report.aggregate(report.find_runs([str(tmp_path)]))
    assert row["columns"] == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    assert row["cells"]["clipart"]["val"] == row["cells"]["infograph"]["val"]
    assert row["cells"]["clipart"]["test"] == pytest.approx({"mean": 51.0, "err": 1.0, "n": 2})
    assert row["cells"]["quickdraw"]["test"]["mean"] == pytest.approx(11.0)
    assert row["avg"]["val"]["mean"] == pytest.approx(61.0)


def test_fewer_seeds_in_a_cell_are_marked(tmp_path):
    _pacs_sweep(tmp_path)
    # Drop one seed of one domain: its cell says n=1 and the Avg uses only complete seeds.
    os.remove(os.path.join(tmp_path, "fqat", "photo", "seed23", rundir.RESULTS))
    (row,) = report.aggregate(report.find_runs([str(tmp_path)]))
    assert row["cells"]["photo"]["val"] == pytest.approx({"mean": 90.0, "err": 0.0, "n": 1})
    assert row["avg"]["val"] == pytest.approx({"mean": 75.0, "err": 0.0, "n": 1})
    assert "90.00 ± 0.00 (n=1)" in report.to_markdown([row])


def test_cli_writes_markdown_and_csv(tmp_path, capsys):
    _pacs_sweep(tmp_path / "runs")
    md, table = tmp_path / "t.md", tmp_path / "t.csv"
    assert report.main([str(tmp_path / "runs"), "--out", str(md), "--csv", str(table)]) == 0
    assert md.read_text() == capsys.readouterr().out
    (row,) = list(csv.DictReader(io.StringIO(table.read_text())))
    assert float(row["art_painting_val_mean"]) == pytest.approx(82.0)
    assert float(row["art_painting_val_std"]) == pytest.approx(2.0)
    assert float(row["avg_test_mean"]) == pytest.approx(56.0)
    assert row["seeds"] == "0 23" and json.loads(row["hparams"])["freeze_interval"] == 350


def test_bad_input_exits_1_with_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 1
    assert f"{empty}: no finished run" in capsys.readouterr().err
    assert report.main([str(tmp_path / "absent")]) == 1
    assert "not a folder" in capsys.readouterr().err
    make_run(tmp_path / "mixed", "a", "art_painting", 0, 0.8, 0.5)
    make_run(tmp_path / "mixed", "b", "Art", 0, 0.8, 0.5, dataset="office_home")
    assert report.main([str(tmp_path / "mixed")]) == 1
    assert "2 datasets ['office_home', 'pacs'] in one table" in capsys.readouterr().err
    first = make_run(tmp_path / "dup" / "x", "a", "art_painting", 0, 0.8, 0.5)
    second = make_run(tmp_path / "dup" / "y", "a", "art_painting", 0, 0.8, 0.6)
    with pytest.raises(report.ReportError, match="different results"):
        report.aggregate([first, second])
    same = make_run(tmp_path / "dup" / "z", "a", "art_painting", 0, 0.8, 0.5)
    assert report.aggregate([first, same])[0]["runs"] == 1  # one ERM run found twice
    broken = tmp_path / "broken" / "r"
    rundir.write_json(str(broken / rundir.RESULTS), {"dataset": "pacs"})
    assert report.main([str(tmp_path / "broken")]) == 1
    assert "results.json: missing key(s)" in capsys.readouterr().err
    with pytest.raises(report.ReportError, match="error='var'"):
        report.aggregate([first], error="var")


def test_paired_differences_seed_by_seed(tmp_path):
    # lsq: TABLE; fqat: TABLE + a per-seed, per-domain offset; erm at full precision.
    offsets = {"art_painting": (0.02, 0.04), "cartoon": (-0.01, 0.03), "photo": (0.0, 0.0),
               "sketch": (0.05, -0.01)}
    for domain, per_seed in TABLE.items():
        for i, (seed, (val, test)) in enumerate(zip((0, 23), per_seed)):
            make_run(tmp_path, "lsq", domain, seed, val, test, "lsq")
            make_run(tmp_path, "fqat", domain, seed, val, test + offsets[domain][i], "fqat")
            make_run(tmp_path, "erm", domain, seed, val, test + 0.10, "erm")
            make_run(tmp_path, "fqat3", domain, seed, val, test, "fqat", bits=3)
    rows = report.aggregate(report.find_runs([str(tmp_path)]))
    pairs = report.paired_differences(rows, "lsq")
    # fqat at 3 bits has no lsq row at 3 bits: not paired.
    assert [(p["label"], p["bits"]) for p in pairs] == [("fqat (lsq)", "4/4")]
    art = pairs[0]["columns"]["art_painting"]
    # Differences +2 and +4 points: mean 3, population std 1, both seeds higher.
    assert art == pytest.approx({"mean": 3.0, "err": 1.0, "n": 2, "wins": 2})
    assert pairs[0]["columns"]["photo"]["wins"] == 0
    # Per-seed averages of the differences: (2 - 1 + 0 + 5) / 4 = 1.5 and (4 + 3 + 0 - 1) / 4
    # = 1.5.
    assert pairs[0]["avg"] == pytest.approx({"mean": 1.5, "err": 0.0, "n": 2, "wins": 2})
    against_erm = report.paired_differences(rows, "erm")
    assert sorted(p["bits"] for p in against_erm) == ["3/3", "4/4", "4/4"]
    lsq_vs_erm = next(p for p in against_erm if p["label"] == "lsq (lsq)")
    assert lsq_vs_erm["avg"] == pytest.approx({"mean": -10.0, "err": 0.0, "n": 2, "wins": 0})
    text = report.paired_markdown(pairs, rows[0]["columns"], "lsq")
    assert "| fqat (lsq) | 4/4 | lsq (lsq) | +3.00 ± 1.00 (2/2) |" in text
    with pytest.raises(report.ReportError, match="--paired_with=sgd: no row of that method"):
        report.paired_differences(rows, "sgd")


def test_cli_paired_tables_follow_the_main_table(tmp_path, capsys):
    _pacs_sweep(tmp_path, "lsq", "lsq")
    _pacs_sweep(tmp_path, "fqat", "fqat", shift=0.01)
    assert report.main([str(tmp_path), "--paired_with=lsq"]) == 0
    out = capsys.readouterr().out
    assert out.index("### Paired Test differences against lsq") > out.index("| Method | W/A |")
    assert "| fqat (lsq) | 4/4 | lsq (lsq) | +1.00 ± 0.00 (2/2) |" in out
    assert report.main([str(tmp_path), "--paired_with=erm"]) == 1
    assert "--paired_with=erm: no row of that method" in capsys.readouterr().err


def test_split_tables_hold_one_part_per_domain(tmp_path):
    _pacs_sweep(tmp_path)
    rows = report.aggregate(report.find_runs([str(tmp_path)]))
    val = report.to_markdown(rows, split="val")
    assert "| Method | W/A | art_painting | cartoon | photo | sketch | Avg | Seeds |" in val
    # Val per domain: (80, 84), (70, 72), (90, 90), (60, 66); Avg per seed 75 and 78.
    assert ("| fqat (lsq) | 4/4 | 82.00 ± 2.00 | 71.00 ± 1.00 | 90.00 ± 0.00 | 63.00 ± 3.00 "
            "| 76.50 ± 1.50 | 0, 23 |") in val
    assert "Val = training-domain validation" in val and "Test = held-out" not in val
    test = report.to_markdown(rows, split="test")
    assert ("| fqat (lsq) | 4/4 | 42.00 ± 2.00 | 53.00 ± 3.00 | 61.00 ± 1.00 | 68.00 ± 2.00 "
            "| 56.00 ± 1.00 | 0, 23 |") in test
    assert "Val = " not in test
    with pytest.raises(report.ReportError, match="--split=both"):
        report.to_markdown(rows, split="both")


def test_best_setting_averages_validation_over_groups_and_seeds(tmp_path):
    # lr 1e-5 wins on art_painting, 3e-5 on the mean over both domains and seeds.
    for lr, vals in ((1e-5, (0.90, 0.50)), (3e-5, (0.80, 0.70))):
        for domain, val in zip(("art_painting", "sketch"), vals):
            for seed in (0, 23):
                make_run(tmp_path, f"lr{lr}", domain, seed, val, 1.0 - val, hparams={"lr": lr})
    runs = [report.load_run(d) for d in report.find_runs([str(tmp_path)])]
    chosen = report.best_setting(runs)
    assert {r.hparams["lr"] for r in chosen} == {3e-5} and len(chosen) == 4
    art = [r for r in runs if r.test_domains == ("art_painting",)]
    assert {r.hparams["lr"] for r in report.best_setting(art)} == {1e-5}
