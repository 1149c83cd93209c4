"""Folder layouts: indexing as ImageFolder does, and every kind of bad input, before training."""
import os
import re

import numpy as np
import pytest

from fqat_tf.data import DATASETS, DataError, load_splits
from fqat_tf.data.folder import find_bad_files, read_folder_tree
from fqat_tf.data.synthetic import write_image_tree

DOMAINS = ("d_a", "d_b", "d_c")
CLASSES = ("cat", "dog")


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "tree")
    write_image_tree(root, DOMAINS, CLASSES, images_per_class=3, formats=("png", "jpg"))
    return root


def test_domains_and_classes_are_discovered_and_indexed(tree):
    classes, domains, skipped = read_folder_tree(tree)
    assert classes == CLASSES
    assert [d.name for d in domains] == list(DOMAINS)
    assert skipped == ()
    d_b = domains[1]
    expected = [os.path.join(tree, "d_b", c, f"{i:04d}.{fmt}") for c in CLASSES
                for i, fmt in zip(range(3), ("png", "jpg", "png"))]
    assert d_b.paths.tolist() == expected
    assert d_b.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_files_are_found_recursively_in_sorted_order_and_hidden_ones_ignored(tmp_path):
    root = str(tmp_path)
    write_image_tree(root, ["x"], ["k"], images_per_class=2)
    nested = os.path.join(root, "x", "k", "sub")
    write_image_tree(nested, [""], [""], images_per_class=1)
    with open(os.path.join(root, "x", "k", ".DS_Store"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, "x", ".cache"))
    _, (domain,), _ = read_folder_tree(root)
    names = [os.path.relpath(p, root) for p in domain.paths]
    assert names == ["x/k/0000.png", "x/k/0001.png", "x/k/sub/0000.png"]


def test_image_folder_splits(tree):
    splits = load_splits("image_folder", tree, test_domains="d_c", image_size=8)
    assert splits.info.domains == DOMAINS
    assert splits.info.num_classes == 2 and splits.class_names == CLASSES
    assert splits.info.input_shape == (8, 8, 3)
    assert splits.train_domains == ("d_a", "d_b") and splits.test_domains == ("d_c",)
    # 6 images per domain: int(6 * 0.2) = 1 held out.
    assert [len(splits.train[d]) for d in ("d_a", "d_b")] == [5, 5]
    assert [len(splits.val[d]) for d in ("d_a", "d_b")] == [1, 1]
    assert len(splits.test["d_c"]) == 6


@pytest.mark.parametrize("nested", [True, False])
def test_pacs_layout(tmp_path, nested):
    info = DATASETS["pacs"]
    root = str(tmp_path / "PACS") if nested else str(tmp_path)
    write_image_tree(root, info.domains, info.class_names, images_per_class=1)
    splits = load_splits("pacs", str(tmp_path), test_domains=["sketch"], image_size=8)
    assert splits.class_names == info.class_names
    assert splits.train_domains == ("art_painting", "cartoon", "photo")
    assert len(splits.test["sketch"]) == 7


def test_domain_net_folder_needs_its_345_classes(tmp_path):
    info = DATASETS["domain_net"]
    write_image_tree(str(tmp_path / "domain_net"), info.domains, ["aircraft", "ant", "apple"],
                     images_per_class=1)
    with pytest.raises(DataError, match="has 3 class folders per domain; domain_net has 345"):
        load_splits("domain_net", str(tmp_path), test_domains=[0, 1])


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_splits("image_folder", missing)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_splits("pacs", missing)
    with pytest.raises(DataError, match="data_dir is required"):
        load_splits("pacs")


def test_missing_domain_folder(tmp_path):
    info = DATASETS["pacs"]
    write_image_tree(str(tmp_path / "PACS"), info.domains[:3], info.class_names)
    with pytest.raises(FileNotFoundError, match=r"domain folder .*PACS/sketch does not exist"):
        load_splits("pacs", str(tmp_path))


def test_class_folders_that_differ_between_domains(tree):
    os.rename(os.path.join(tree, "d_b", "dog"), os.path.join(tree, "d_b", "doge"))
    with pytest.raises(DataError, match=r"domain 'd_b'.*missing \['dog'\], unexpected \['doge'\]"):
        load_splits("image_folder", tree)


def test_classes_that_differ_from_the_dataset(tmp_path):
    info = DATASETS["pacs"]
    classes = info.class_names[:6] + ("people",)
    write_image_tree(str(tmp_path / "PACS"), info.domains, classes)
    with pytest.raises(DataError, match=r"missing \['person'\], unexpected \['people'\]"):
        load_splits("pacs", str(tmp_path))


def test_empty_class(tree):
    folder = os.path.join(tree, "d_a", "dog")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    with pytest.raises(DataError, match=r"class folder .*d_a/dog has no images"):
        load_splits("image_folder", tree)


def test_domain_without_class_folders(tmp_path):
    os.makedirs(tmp_path / "only")
    with pytest.raises(DataError, match="has no class folders"):
        load_splits("image_folder", str(tmp_path), test_domains=())
    os.rmdir(tmp_path / "only")
    with pytest.raises(DataError, match="no domain folders under"):
        load_splits("image_folder", str(tmp_path))


def test_unknown_dataset_and_domain(tree):
    with pytest.raises(DataError, match="unknown dataset 'imagefolder'"):
        load_splits("imagefolder", tree)
    with pytest.raises(DataError, match=r"unknown test domain 'd_z'; the domains are \['d_a'"):
        load_splits("image_folder", tree, test_domains="d_z")


def test_test_domain_that_is_also_a_training_domain(tree):
    with pytest.raises(DataError, match=r"\['d_b'\] given both as test and as training"):
        load_splits("image_folder", tree, test_domains=["d_b"], train_domains=["d_a", "d_b"])
    with pytest.raises(DataError, match="no training domain left"):
        load_splits("image_folder", tree, test_domains=[0, 1, 2])


@pytest.mark.parametrize("kwargs, message", [
    ({"holdout_fraction": 1.0}, r"holdout_fraction=1.0; expected a value in \[0, 1\)"),
    ({"holdout_fraction": -0.1}, "holdout_fraction=-0.1"),
    ({"image_size": 0}, "image_size=0"),
    ({"source": "web"}, "source='web'"),
    ({"verify": "all"}, "verify='all'"),
])
def test_bad_arguments(tree, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_splits("image_folder", tree, **kwargs)


def _plant(tree, name, content):
    path = os.path.join(tree, "d_b", "cat", name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_non_image_file_is_named(tree):
    path = _plant(tree, "notes.txt", b"these are not pixels")
    message = f"1 file.*not readable images:\n  {path}\n.*skip_bad_files"
    with pytest.raises(DataError, match=message):
        load_splits("image_folder", tree)


def test_truncated_jpeg_is_found_by_decoding(tree):
    good = os.path.join(tree, "d_a", "dog", "0001.jpg")
    with open(good, "rb") as f:
        data = f.read()
    path = _plant(tree, "broken.jpg", data[: len(data) // 2])
    # Its header is a valid JPEG header: only a decode finds it.
    assert find_bad_files([path], verify="header") == []
    assert find_bad_files([good, path], verify="decode") == [path]
    with pytest.raises(DataError, match="broken.jpg"):
        load_splits("image_folder", tree)


def test_bad_files_can_be_skipped_and_are_counted(tree, caplog):
    bad = [_plant(tree, "a.txt", b"text"), _plant(tree, "b.png", b"")]
    splits = load_splits("image_folder", tree, skip_bad_files=True, test_domains="d_c")
    assert sorted(splits.skipped_files) == sorted(bad)
    assert "skipped 2 file(s)" in caplog.text
    source = splits.train["d_b"]
    kept = np.concatenate([source.paths[source.indices], splits.val["d_b"].paths[
        splits.val["d_b"].indices]])
    assert len(kept) == 6 and not set(bad) & set(kept.tolist())


def test_skipping_every_image_of_a_class_still_fails(tree):
    folder = os.path.join(tree, "d_c", "cat")
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"garbage")
    with pytest.raises(DataError, match=r"d_c/cat has no images"):
        load_splits("image_folder", tree, skip_bad_files=True)


def test_domain_arguments_are_checked_before_the_files(tree):
    _plant(tree, "broken.png", b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="unknown test domain 'd_q'"):
        load_splits("image_folder", tree, test_domains="d_q")
    with pytest.raises(DataError, match="unknown test domain 'cartoons'"):
        load_splits("pacs", tree, test_domains="cartoons")


def _link(tree, name, target, where=("d_a", "cat")):
    path = os.path.join(tree, *where, name)
    os.symlink(target, path)
    return path


def _domain_size(splits, name):
    return len(splits.train[name]) + len(splits.val.get(name, ()))


@pytest.mark.parametrize("target", ["..", ".", "../.."])
def test_a_symlink_loop_is_refused_or_skipped_by_name(tree, target, caplog):
    loop = _link(tree, "loop", target)
    real = os.path.realpath(loop)
    with pytest.raises(DataError, match=re.escape(
            f"1 unsafe path(s) under the data root {tree}:\n  {loop}: a symlink to {real}, a "
            f"folder that contains it: it loops\nremove or fix them, or pass skip_bad_files")):
        load_splits("image_folder", tree, test_domains="d_c")
    splits = load_splits("image_folder", tree, test_domains="d_c", skip_bad_files=True)
    # The domain keeps its 6 images (a followed loop lists them again at every level).
    assert _domain_size(splits, "d_a") == 6
    assert loop in splits.skipped_files and loop in caplog.text


def test_a_symlink_out_of_the_data_root_is_refused_or_skipped(tree, tmp_path, caplog):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(open(os.path.join(tree, "d_b", "cat", "0000.png"), "rb").read())
    link = _link(tree, "far.png", str(outside))
    with pytest.raises(DataError, match=re.escape(
            f"{link}: a symlink to {outside}, outside the data root")):
        load_splits("image_folder", tree)
    folder_link = _link(tree, "far", str(tmp_path), where=("d_b", "dog"))
    splits = load_splits("image_folder", tree, test_domains="d_c", skip_bad_files=True)
    assert _domain_size(splits, "d_a") == _domain_size(splits, "d_b") == 6
    assert {link, folder_link} <= set(splits.skipped_files)
    assert link in caplog.text and folder_link in caplog.text


def test_symlinks_inside_the_root_are_followed(tree):
    image = _link(tree, "copy.png", os.path.join(tree, "d_b", "cat", "0000.png"))
    relative = _link(tree, "sibling.png", os.path.join("..", "dog", "0001.jpg"))
    folder_link = _link(tree, "more", os.path.join(tree, "d_c", "cat"))
    _, (d_a,), skipped = read_folder_tree(tree, ["d_a"])
    cat = [p for p, label in zip(d_a.paths.tolist(), d_a.labels) if label == 0]
    assert cat[:5] == [os.path.join(tree, "d_a", "cat", n) for n in (
        "0000.png", "0001.jpg", "0002.png", "copy.png", "sibling.png")]
    assert cat[5:] == [os.path.join(folder_link, n) for n in ("0000.png", "0001.jpg", "0002.png")]
    assert skipped == () and image in cat and relative in cat


def test_a_dangling_symlink_is_named_as_unreadable(tree):
    link = _link(tree, "gone.png", os.path.join(tree, "d_a", "cat", "nothing.png"))
    with pytest.raises(DataError, match=re.escape(f"not readable images:\n  {link}\n")):
        load_splits("image_folder", tree)


def test_a_file_name_that_is_not_utf8_is_named(tree, caplog):
    folder = os.path.join(os.fsencode(tree), b"d_b", b"dog")
    path = os.path.join(folder, b"caf\xe9.png")
    with open(path, "wb") as f:
        f.write(open(os.path.join(tree, "d_b", "cat", "0000.png"), "rb").read())
    shown = repr(path)
    with pytest.raises(DataError, match=re.escape(f"{shown}: its name is not valid UTF-8")):
        load_splits("image_folder", tree)
    splits = load_splits("image_folder", tree, test_domains="d_c", skip_bad_files=True)
    assert _domain_size(splits, "d_b") == 6 and shown in splits.skipped_files
    assert shown in caplog.text


def test_a_class_folder_name_that_is_not_utf8_is_named(tree):
    bad = os.path.join(os.fsencode(tree), b"d_a", b"\xff\xfe")
    os.makedirs(bad)
    with pytest.raises(DataError, match=re.escape(
            f"folder {bad!r} under {os.path.join(tree, 'd_a')}: the name is not valid UTF-8")):
        load_splits("image_folder", tree)
