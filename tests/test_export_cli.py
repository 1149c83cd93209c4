"""`python -m export.tflite` and `python -m export.verify` on tiny run directories, and bad
input: clear errors, non-zero exits, nothing written."""
import json
import os

import keras
import pytest

from export import tflite as export_cli
from export import verify as verify_cli
from helpers import RUN_FLAGS, make_model_run, tiny_cnn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_model_run(str(tmp_path_factory.mktemp("run") / "qat"))


def test_export_and_verify_a_run_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "model.tflite"
    assert export_cli.main([run_dir, "--out", str(out), "--representative_batches", "1"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "--int8_storage" in captured.err      # a model of the paper's recipe
    assert summary["bytes"] == out.stat().st_size > 0
    assert summary["float_layers"] == [] and summary["range_tensors"] >= 3
    # Only the finished file is left in the folder (the temporary one was renamed).
    assert os.listdir(tmp_path) == ["model.tflite"]
    assert verify_cli.main([str(out), run_dir, "--max_batches", "1",
                            "--min_agreement", "0"]) == 0
    report = json.loads(capsys.readouterr().out)["75"]
    assert report["images"] == 64 and report["float_tensors"] == []
    assert 0.0 <= report["agreement"] <= 1.0 and report["input_dtype"] == "int8"
    # The same run with float input and output.
    out_f = tmp_path / "float_io.tflite"
    assert export_cli.main([run_dir, "--out", str(out_f), "--io", "float",
                            "--representative_batches", "1"]) == 0
    capsys.readouterr()
    assert verify_cli.main([str(out_f), run_dir, "--max_batches", "1",
                            "--min_agreement", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["75"]["input_dtype"] == "float32"
    # Below the bound: exit 1, naming the domain, and (a model of the paper's recipe) the fix.
    assert verify_cli.main([str(out_f), run_dir, "--max_batches", "1",
                            "--min_agreement", "1.01"]) == 1
    err = capsys.readouterr().err
    assert "FAIL 75: agreement" in err and "--int8_storage" in err


def _bad(tmp_path, name, flags=RUN_FLAGS, model_bytes=None):
    root = tmp_path / name
    root.mkdir()
    if model_bytes is not None:
        (root / "model.keras").write_bytes(model_bytes)
    if flags is not None:
        (root / "flags.json").write_text(flags if isinstance(flags, str) else json.dumps(flags))
    return str(root)


@pytest.mark.parametrize("case,message", [
    ("missing", "no such run directory"),
    ("no_model", "not a run directory"),
    ("garbage_model", "cannot load the Keras model"),
    ("no_flags", "flags.json: no such file"),
    ("bad_json", "not valid JSON"),
    ("missing_key", "missing key(s) ['batch_per_domain']"),
    ("keras_without_data", "needs --dataset"),
    ("out_folder_missing", "--out="),
])
def test_bad_input_fails_before_writing(run_dir, tmp_path, capsys, case, message):
    out = tmp_path / "out" / "m.tflite"
    out.parent.mkdir()
    out.write_bytes(b"old")
    source = {
        "missing": lambda: str(tmp_path / "nope"),
        "no_model": lambda: _bad(tmp_path, case),
        "garbage_model": lambda: _bad(tmp_path, case, model_bytes=b"not a zip"),
        "no_flags": lambda: _bad(tmp_path, case, flags=None, model_bytes=b"x"),
        "bad_json": lambda: _bad(tmp_path, case, flags="{", model_bytes=b"x"),
        "missing_key": lambda: _bad(tmp_path, case, model_bytes=b"x",
                                    flags={k: v for k, v in RUN_FLAGS.items()
                                           if k != "batch_per_domain"}),
        "keras_without_data": lambda: os.path.join(run_dir, "model.keras"),
        "out_folder_missing": lambda: run_dir,
    }[case]()
    target = tmp_path / "absent" / "m.tflite" if case == "out_folder_missing" else out
    assert export_cli.main([source, "--out", str(target)]) == 1
    assert message in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    assert not (tmp_path / "absent").exists()


def test_unsupported_layer_named_then_left_float_on_request(tmp_path, capsys):
    root = make_model_run(str(tmp_path / "run"),
                          tiny_cnn(keras.layers.LayerNormalization(name="ln")))
    out = tmp_path / "m.tflite"
    assert export_cli.main([root, "--out", str(out), "--representative_batches", "1"]) == 1
    err = capsys.readouterr().err
    assert "'ln' (LayerNormalization) cannot be kept integer" in err and "--allow_float" in err
    assert not out.exists()
    assert export_cli.main([root, "--out", str(out), "--representative_batches", "1",
                            "--allow_float"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["float_layers"][0].startswith("ln (LayerNormalization")
    assert "layers left float: ln" in captured.err
    # verify reports the float tensors and fails on them.
    assert verify_cli.main([str(out), root, "--max_batches", "1", "--min_agreement", "0"]) == 1
    assert "float tensors" in capsys.readouterr().err


def test_keras_file_with_random_representative_warns(run_dir, tmp_path, capsys):
    out = tmp_path / "m.tflite"
    assert export_cli.main([os.path.join(run_dir, "model.keras"), "--out", str(out),
                            "--random_representative", "--representative_batches", "1"]) == 0
    assert "WARNING: --random_representative" in capsys.readouterr().err
    assert out.stat().st_size > 0


def test_verify_bad_input(run_dir, tmp_path, capsys):
    assert verify_cli.main([str(tmp_path / "none.tflite"), run_dir]) == 1
    assert "no such .tflite file" in capsys.readouterr().err
    (tmp_path / "m.tflite").write_bytes(b"x")
    assert verify_cli.main([str(tmp_path / "m.tflite"), str(tmp_path / "no_run")]) == 1
    assert "no such run directory" in capsys.readouterr().err
