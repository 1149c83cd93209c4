"""The training program on bad image trees: exit 1, the culprit named, nothing written."""
import os
import subprocess
import sys

import pytest

from fqat_tf.data.synthetic import write_image_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
