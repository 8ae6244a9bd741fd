"""The `yolo` source on tiny images/ + labels/ folders written by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import calib


def yolo_set(root: Path, image_file, labels: dict[str, str], names: str | None = "classes") -> Path:
    """root/images/<stem>.png (20x16) with root/labels/<stem>.txt holding `labels[stem]`."""
    for stem, text in labels.items():
        image_file(root / "images" / f"{stem}.png")
        (root / "labels").mkdir(parents=True, exist_ok=True)
        if text is not None:
            (root / "labels" / f"{stem}.txt").write_text(text)
    if names == "classes":
        (root / "classes.txt").write_text("zero\none\ntwo\n")
    elif names == "yaml":
        (root / "data.yaml").write_text("path: .\nnames:\n  0: person\n  1: car\n")
    return root


def test_normalised_boxes_scale_to_image_size(tmp_path, image_file):
    yolo_set(tmp_path, image_file, {"a": "1 0.5 0.5 0.5 0.25\n\n2 0.25 0.75 0.5 0.5\n", "b": ""})
    ds = calib.get_dataset("yolo", "train", root=tmp_path, use_all=True, image_size=64)
    assert (ds.task, ds.class_names, ds.num_classes, ds.image_size) == ("detection", ["zero", "one", "two"], 3, 64)
    image, target = ds[0]
    assert image.shape == (3, 64, 64), f"image resized to 64, got {image.shape}"
    assert torch.allclose(target["boxes"], torch.tensor([[16.0, 24.0, 48.0, 40.0], [0.0, 32.0, 32.0, 64.0]]))
    assert target["labels"].tolist() == [1, 2], "class ids from the label file"
    assert ds[1][1]["boxes"].shape == (0, 4), "an empty label file means no objects"


def test_names_from_data_yaml_or_label_ids(tmp_path, image_file):
    yolo_set(tmp_path / "y", image_file, {"a": "1 .5 .5 .2 .2"}, "yaml")
    ds = calib.get_dataset("yolo", "val", root=tmp_path / "y", use_all=True)
    assert ds.class_names == ["person", "car"], f"names from data.yaml, got {ds.class_names}"
    yolo_set(tmp_path / "n", image_file, {"a": "4 .5 .5 .2 .2"}, None)
    ds = calib.get_dataset("yolo", "val", root=tmp_path / "n", use_all=True)
    assert ds.class_names == ["0", "1", "2", "3", "4"], f"numeric names up to the largest id, got {ds.class_names}"
    ds = calib.get_dataset("yolo", "val", root=tmp_path / "n", use_all=True, classes=[str(i) for i in range(9)])
    assert ds.num_classes == 9, "the classes option wins"


def test_split_layouts(tmp_path, image_file):
    for split in ("train", "val"):
        yolo_set(tmp_path / "flat" / split, image_file, {f"{split}{i}": "0 .5 .5 .2 .2" for i in range(2)}, None)
        for i in range(3):
            image_file(tmp_path / "ultra" / "images" / split / f"{i}.png")
            (tmp_path / "ultra" / "labels" / split).mkdir(parents=True, exist_ok=True)
    ds = calib.get_dataset("yolo", "val", root=tmp_path / "flat")
    assert [r.image.name for r in ds.records] == ["val0.png", "val1.png"], "root/val/images used whole"
    assert len(calib.get_dataset("yolo", "calib", root=tmp_path / "ultra")) == 3, "images/train for calib"


def test_hash_split_is_disjoint(tmp_path, image_file):
    yolo_set(tmp_path, image_file, {f"im{i:02d}": "0 .5 .5 .2 .2" for i in range(30)})
    sets = {s: {r.image for r in calib.get_dataset("yolo", s, root=tmp_path).records} for s in calib.SPLITS}
    assert sum(map(len, sets.values())) == 30 and all(sets.values()), f"sizes {[len(v) for v in sets.values()]}"
    for a, b in [("train", "val"), ("train", "calib"), ("val", "calib")]:
        assert not sets[a] & sets[b], f"{a} and {b} share images"


@pytest.mark.parametrize(
    "line, rule",
    [
        ("0 0.5 0.5 0.2", "line 2: malformed line (expected 'class cx cy w h', got 4 values"),
        ("0 0.5 0.5 0.2 abc", "line 2: malformed line (non-numeric value"),
        ("1.5 0.5 0.5 0.2 0.2", "line 2: malformed line (class id must be an integer"),
        ("3 0.5 0.5 0.2 0.2", "line 2: class id 3 out of range [0, 3) (classes from"),
        ("-1 0.5 0.5 0.2 0.2", "line 2: class id -1 out of range [0, 3)"),
        ("0 0.9 0.5 0.4 0.2", "line 2 has a box out of the image ([0.9, 0.5, 0.4, 0.2] normalised to [0, 1])"),
        ("0 0.5 0.5 0 0.2", "line 2 has a box with width <= 0"),
        ("0 0.5 0.5 0.2 -0.1", "line 2 has a box with height <= 0"),
    ],
)
def test_bad_label_line_names_file_and_rule(tmp_path, image_file, data_error, line, rule):
    yolo_set(tmp_path, image_file, {"a": "0 0.5 0.5 0.1 0.1\n" + line})
    build = lambda: calib.get_dataset("yolo", "train", root=tmp_path, use_all=True)  # noqa: E731
    data_error(build, f"{tmp_path / 'labels' / 'a.txt'}: {rule}")


def test_layout_errors(tmp_path, image_file, data_error):
    build = lambda: calib.get_dataset("yolo", "train", root=tmp_path)  # noqa: E731
    data_error(build, f"{tmp_path / 'images'}: path does not exist")
    (tmp_path / "images").mkdir()
    data_error(build, f"{tmp_path / 'images'}: empty folder")
    image_file(tmp_path / "images" / "a.png")
    data_error(build, f"{tmp_path / 'labels'}: path does not exist")
    (tmp_path / "labels").mkdir()
    (tmp_path / "data.yaml").write_text("names: [a, b\n")
    data_error(build, f"{tmp_path / 'data.yaml'}: malformed YAML")
    (tmp_path / "data.yaml").write_text("nc: 2\n")
    data_error(build, f"{tmp_path / 'data.yaml'}: malformed data.yaml")
