"""The manifest of verified files: what a second start-up checks again, where it lives, races."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from fqat_tf import defaults
from fqat_tf.data import DataError, folder, load_splits, manifest
from fqat_tf.data.synthetic import write_image_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.delenv(defaults.DATA_CACHE_ENV, raising=False)
    root = str(tmp_path / "tree")
    write_image_tree(root, ["a", "b"], ["x", "y"], images_per_class=3, formats=("png", "jpg"))
    return root


@pytest.fixture
def checked(monkeypatch):
    """Records every file the header check opens and every file the decode check decodes."""
    seen = {"header": [], "decode": []}
    is_header, undecodable = folder._is_image_header, folder._undecodable

    def header(path):
        seen["header"].append(path)
        return is_header(path)

    def decode(paths):
        seen["decode"].extend(paths)
        return undecodable(paths)

    monkeypatch.setattr(folder, "_is_image_header", header)
    monkeypatch.setattr(folder, "_undecodable", decode)
    return seen


def _load(root, **kwargs):
    return load_splits("image_folder", root, test_domains="b", **kwargs)


def _reset(seen):
    for calls in seen.values():
        calls.clear()


def _entries(root):
    with open(os.path.join(root, defaults.MANIFEST_NAME)) as f:
        return json.load(f)["files"]


def test_a_second_start_up_decodes_nothing(tree, checked):
    _load(tree)
    assert len(checked["decode"]) == len(checked["header"]) == 12
    assert sorted(_entries(tree)) == sorted(os.path.relpath(p, tree) for p in checked["decode"])
    _reset(checked)
    _load(tree)
    assert checked == {"header": [], "decode": []}


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_a_changed_file_is_checked_again(tree, checked, change):
    _load(tree)
    path = os.path.join(tree, "a", "y", "0001.jpg")
    if change == "mtime":
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    else:
        with open(path, "ab") as f:
            f.write(b"\0")  # Bytes after a JPEG's end are ignored by decoders.
    _reset(checked)
    _load(tree)
    assert checked["decode"] == [path]
    assert _entries(tree)["a/y/0001.jpg"][:2] == [os.stat(path).st_size,
                                                 os.stat(path).st_mtime_ns]


def test_new_files_are_checked_and_removed_ones_forgotten(tree, checked):
    _load(tree)
    shutil.copyfile(os.path.join(tree, "a", "x", "0000.png"),
                    os.path.join(tree, "a", "x", "0003.png"))
    os.remove(os.path.join(tree, "b", "y", "0000.png"))
    _reset(checked)
    _load(tree)
    assert checked["decode"] == [os.path.join(tree, "a", "x", "0003.png")]
    entries = _entries(tree)
    assert "a/x/0003.png" in entries and "b/y/0000.png" not in entries and len(entries) == 12


def test_a_corrupt_file_is_named_at_every_start_up(tree, checked):
    _load(tree)
    path = os.path.join(tree, "b", "x", "0001.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    for _ in range(2):
        with pytest.raises(DataError, match="0001.jpg"):
            _load(tree)
    splits = _load(tree, skip_bad_files=True)
    assert splits.skipped_files == (path,)
    assert "b/x/0001.jpg" not in _entries(tree)


def test_a_header_check_does_not_vouch_for_a_decode(tree, checked):
    _load(tree, verify="header")
    assert checked["decode"] == []
    _load(tree, verify="header")
    _reset(checked)
    _load(tree)
    assert len(checked["decode"]) == 12
    _reset(checked)
    _load(tree, verify="header")
    assert checked == {"header": [], "decode": []}


def test_where_the_manifest_lives(tree, tmp_path, monkeypatch):
    assert manifest.location(tree) == os.path.join(tree, ".fqat_tf_manifest.json")
    given = str(tmp_path / "given")
    named = manifest.location(tree, given)
    assert os.path.dirname(named) == os.path.join(given, "manifests")
    # The same root, however it is spelled, has the same manifest.
    assert manifest.location(os.path.join(tree, "a", ".."), given) == named
    assert manifest.location(str(tmp_path), given) != named
    monkeypatch.setenv(defaults.DATA_CACHE_ENV, str(tmp_path / "env"))
    assert manifest.location(tree).startswith(str(tmp_path / "env") + os.sep)
    assert manifest.location(tree, given) == named
    monkeypatch.delenv(defaults.DATA_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(manifest.os, "access", lambda path, mode: False)  # a read-only root
    assert manifest.location(tree).startswith(
        str(tmp_path / "home" / ".cache" / "fqat_tf" / "manifests") + os.sep)


def test_a_manifest_in_a_cache_folder_serves_the_next_start_up(tree, checked, tmp_path):
    cache = str(tmp_path / "cache")
    _load(tree, cache_dir=cache)
    assert not os.path.exists(os.path.join(tree, defaults.MANIFEST_NAME))
    _reset(checked)
    _load(tree, cache_dir=cache)
    assert checked["decode"] == []


def test_an_unwritable_manifest_costs_time_only(tree, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    splits = _load(tree, cache_dir=str(blocker))
    assert len(splits.train["a"]) == 5
    assert "could not lock the manifest" in caplog.text


_RACER = """
import sys
from fqat_tf.data import folder, load_splits
decoded = []
undecodable = folder._undecodable
folder._undecodable = lambda paths: decoded.extend(paths) or undecodable(paths)
load_splits("image_folder", sys.argv[1], test_domains="b")
print(len(decoded))
"""


def test_runs_starting_at_once_check_the_files_once(tree):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    runs = [subprocess.Popen([sys.executable, "-c", _RACER, tree], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # One run checked the 12 files; the other waited for it and found them recorded.
    assert sorted(int(out.split()[-1]) for out, _ in outputs) == [0, 12]
    assert len(_entries(tree)) == 12
    # Nothing else is left in the root: no temporary file.
    assert sorted(n for n in os.listdir(tree) if n.startswith(".")) == [
        defaults.MANIFEST_NAME, defaults.MANIFEST_NAME + ".lock"]


@pytest.mark.parametrize("content", [
    "{not json", '{"format": 1, "root": "/elsewhere", "files": {}}', "[1, 2]", None])
def test_a_broken_or_foreign_manifest_is_ignored(tree, checked, content):
    _load(tree)
    path = os.path.join(tree, defaults.MANIFEST_NAME)
    if content is None:  # Entries of the wrong form.
        data = json.load(open(path))
        data["files"] = {rel: "x" for rel in data["files"]}
        content = json.dumps(data)
    with open(path, "w") as f:
        f.write(content)
    _reset(checked)
    _load(tree)
    assert len(checked["decode"]) == 12 and len(_entries(tree)) == 12
