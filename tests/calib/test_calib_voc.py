"""The `voc` source on tiny Annotations/ + JPEGImages/ folders written by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import calib


def voc_xml(filename: str, objects: list[tuple[str, tuple[float, float, float, float]]], size=(40, 30)) -> str:
    """A VOC annotation with `objects` as (name, (xmin, ymin, xmax, ymax))."""
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"<depth>3</depth></size>{body}</annotation>"
    )


def voc_set(root: Path, image_file, annotations: dict[str, list]) -> Path:
    """root/JPEGImages/<stem>.jpg (40x30) and root/Annotations/<stem>.xml for each entry."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for stem, objects in annotations.items():
        image_file(root / "JPEGImages" / f"{stem}.jpg", size=(40, 30))
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", objects))
    return root


def test_boxes_and_sorted_class_names(tmp_path, image_file):
    objects = {"a": [("horse", (1, 1, 20, 15)), ("cat", (11, 16, 40, 30))], "b": [("dog", (5, 5, 9, 9))]}
    voc_set(tmp_path, image_file, objects)
    ds = calib.get_dataset("voc", "train", root=tmp_path, use_all=True, image_size=80)
    assert (ds.task, ds.class_names, ds.num_classes, ds.image_size) == ("detection", ["cat", "dog", "horse"], 3, 80)
    image, target = ds[0]
    assert image.shape == (3, 80, 80), f"resized, got {image.shape}"
    expected = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 40.0, 80.0, 80.0]])
    assert torch.allclose(target["boxes"], expected), f"1-based inclusive -> xyxy, scaled: {target['boxes']}"
    assert target["labels"].tolist() == [2, 0], "horse -> 2, cat -> 0"


def test_classes_option_sets_the_order(tmp_path, image_file):
    voc_set(tmp_path, image_file, {"a": [("horse", (1, 1, 20, 15))]})
    ds = calib.get_dataset("voc", "val", root=tmp_path, use_all=True, classes=["person", "horse"])
    assert ds.class_names == ["person", "horse"] and ds[0][1]["labels"].tolist() == [1], "classes option order"


def test_imagesets_select_the_split(tmp_path, image_file):
    voc_set(tmp_path, image_file, {stem: [("cat", (1, 1, 5, 5))] for stem in "abcd"})
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("d\n")
    names = lambda s: [r.image.stem for r in calib.get_dataset("voc", s, root=tmp_path).records]  # noqa: E731
    assert (names("train"), names("val"), names("calib")) == (["a", "b", "c"], ["d"], ["a", "b", "c"]), "ImageSets"


def test_split_subfolders_share_class_ids(tmp_path, image_file):
    voc_set(tmp_path / "train", image_file, {"a": [("zebra", (1, 1, 5, 5))]})
    voc_set(tmp_path / "val", image_file, {"b": [("ant", (1, 1, 5, 5))]})
    for split in ("train", "val"):
        assert calib.get_dataset("voc", split, root=tmp_path).class_names == ["ant", "zebra"], f"{split} class ids"


@pytest.mark.parametrize(
    "objects, rule",
    [
        ([("cat", (10, 5, 9, 9))], "object 0 has a box with width <= 0 ([10, 5, 9, 9])"),
        ([("cat", (1, 9, 5, 8))], "object 0 has a box with height <= 0"),
        ([("cat", (1, 1, 5, 5)), ("cat", (30, 5, 45, 9))], "object 1 has a box out of the image ([30, 5, 45, 9] in"),
        ([("bird", (1, 1, 5, 5))], "object 0 has unknown class name 'bird' (classes from option classes: cat, dog)"),
    ],
)
def test_bad_object_names_file_and_rule(tmp_path, image_file, data_error, objects, rule):
    voc_set(tmp_path, image_file, {"a": objects})
    call = lambda: calib.get_dataset("voc", "train", root=tmp_path, use_all=True, classes=["cat", "dog"])  # noqa: E731
    data_error(call, f"{tmp_path / 'Annotations' / 'a.xml'}: {rule}")


def test_malformed_and_incomplete_xml(tmp_path, image_file, data_error):
    voc_set(tmp_path, image_file, {"a": [("cat", (1, 1, 5, 5))]})
    xml = tmp_path / "Annotations" / "a.xml"
    call = lambda: calib.get_dataset("voc", "train", root=tmp_path, use_all=True)  # noqa: E731
    xml.write_text("<annotation><object>")
    data_error(call, f"{xml}: malformed XML")
    xml.write_text(voc_xml("a.jpg", [("cat", (1, 1, 5, 5))]).replace("<xmax>5</xmax>", ""))
    data_error(call, f"{xml}: object 0 has no <xmax>")
    xml.write_text(voc_xml("a.jpg", [("cat", (1, 1, "five", 5))]))
    data_error(call, f"{xml}: object 0: <xmax> is not a number ('five')")
    xml.write_text(voc_xml("zz.jpg", [("cat", (1, 1, 5, 5))]).replace("a.jpg", "zz.jpg"))
    (tmp_path / "JPEGImages" / "a.jpg").unlink()
    data_error(call, f"{xml}: image 'zz.jpg' not found in {tmp_path / 'JPEGImages'}")


def test_layout_errors(tmp_path, image_file, data_error):
    build = lambda: calib.get_dataset("voc", "train", root=tmp_path)  # noqa: E731
    data_error(build, f"{tmp_path / 'Annotations'}: path does not exist")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    data_error(build, f"{tmp_path / 'Annotations'}: empty folder")
