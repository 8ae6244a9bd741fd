"""The `folder` source on tiny folders written by the tests: labels, splits, resizing and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import calib
from calib.splits import hash_split


def class_tree(root: Path, image_file, classes=("dog", "cat", "ant"), per_class: int = 12) -> Path:
    """root/<class>/<i>.png for each class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            image_file(root / name / f"{i:02d}.png", colour=(40 * c, 100, 200))
    return root


def test_class_folders_hash_split(tmp_path, image_file):
    root = class_tree(tmp_path / "data", image_file)
    sets = {s: calib.get_dataset("folder", s, root=str(root), image_size=24) for s in calib.SPLITS}
    files = {s: set(ds.files) for s, ds in sets.items()}
    assert sum(len(f) for f in files.values()) == 36, f"split sizes {[len(f) for f in files.values()]}"
    for a, b in [("train", "val"), ("train", "calib"), ("val", "calib")]:
        assert not files[a] & files[b], f"{a} and {b} share files"
    assert all(files.values()), "with 36 files every split gets some"
    assert all(ds.class_names == ["ant", "cat", "dog"] for ds in sets.values()), "sorted class names in every split"
    ds = sets["train"]
    assert (ds.task, ds.num_classes, ds.image_size) == ("classification", 3, 24), "dataset attributes"
    image, label = ds[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32, "resized to image_size"
    assert 0 <= float(image.min()) and float(image.max()) <= 1, "pixels in [0, 1]"
    assert ds.class_names[label] == ds.files[0].parent.name, "label must be the sub-folder's class"
    again = calib.get_dataset("folder", "train", root=root, image_size=24)
    assert again.files == ds.files and again.labels == ds.labels, "hash split must be deterministic"


def test_split_subfolders_and_calib_fallback(tmp_path, image_file):
    root = tmp_path / "data"
    class_tree(root / "train", image_file, classes=("a", "b"), per_class=2)
    class_tree(root / "val", image_file, classes=("b",), per_class=3)
    train = calib.get_dataset("folder", "train", root=root)
    val = calib.get_dataset("folder", "val", root=root)
    calib_split = calib.get_dataset("folder", "calib", root=root)
    assert len(train) == 4 and len(val) == 3, "split sub-folders are used whole"
    assert val.class_names == ["a", "b"] and set(val.labels) == {1}, "class ids agree across split folders"
    assert calib_split.files == train.files, "calib falls back to train/ when there is no calib/"
    assert train.image_size == 224 and train[0][0].shape == (3, 224, 224), "default image_size 224"


def test_flat_folder_is_unlabelled(tmp_path, image_file):
    for i in range(5):
        image_file(tmp_path / "imgs" / f"{i}.jpg")
    ds = calib.get_dataset("folder", "calib", root=tmp_path / "imgs", use_all=True, image_size=16)
    assert len(ds) == 5, "use_all keeps every file"
    assert (ds.num_classes, ds.class_names) == (0, []), "an unlabelled folder has no classes"
    assert [label for _, label in ds] == [-1] * 5, "unlabelled items have label -1"


def test_missing_path(tmp_path, data_error):
    missing = tmp_path / "nope"
    data_error(lambda: calib.get_dataset("folder", "train", root=missing), f"{missing}: path does not exist")


def test_empty_folder(tmp_path, data_error):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    empty = tmp_path / "empty"
    data_error(lambda: calib.get_dataset("folder", "train", root=empty), f"{empty}: empty folder")


def test_loose_images_beside_class_folders(tmp_path, image_file, data_error):
    image_file(tmp_path / "mix" / "a" / "1.png")
    image_file(tmp_path / "mix" / "stray.png")
    data_error(
        lambda: calib.get_dataset("folder", "train", root=tmp_path / "mix"),
        f"{tmp_path / 'mix'}: has both class sub-folders (a) and loose images",
    )


def test_empty_hash_split_says_how_to_fix(tmp_path, image_file, data_error):
    image_file(tmp_path / "one" / "x.png")
    split = next(s for s in calib.SPLITS if s != hash_split("x.png"))
    data_error(
        lambda: calib.get_dataset("folder", split, root=tmp_path / "one"),
        f"{tmp_path / 'one'}: split '{split}' is empty",
        "use_all=True",
    )


def test_missing_split_subfolder(tmp_path, image_file, data_error):
    image_file(tmp_path / "d" / "train" / "a" / "1.png")
    image_file(tmp_path / "d" / "calib" / "a" / "1.png")
    data_error(
        lambda: calib.get_dataset("folder", "val", root=tmp_path / "d"),
        f"{tmp_path / 'd'}: has split sub-folders (train/, calib/) but no 'val/'",
    )


def test_unreadable_image_names_the_file(tmp_path, data_error):
    bad = tmp_path / "bad" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    ds = calib.get_dataset("folder", "train", root=bad.parent, use_all=True)
    data_error(lambda: ds[0], f"{bad}: cannot read image")


def test_bad_image_size(tmp_path, image_file, data_error):
    image_file(tmp_path / "x" / "1.png")
    data_error(
        lambda: calib.get_dataset("folder", "train", root=tmp_path / "x", image_size=-3),
        "image_size must be a positive integer (got -3)",
    )
