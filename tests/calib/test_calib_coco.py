"""The `coco` source on tiny json datasets written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import calib


def coco_set(root: Path, image_file, annotations: list[dict] | None = None, **extra) -> Path:
    """root/a.png (40x30), root/b.png (20x20) and root/ann.json with categories 7 'dog' and 3 'cat'."""
    image_file(root / "a.png", size=(40, 30))
    image_file(root / "b.png", size=(20, 20))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 15]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30]},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 1},
        ],
        **extra,
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def test_boxes_become_scaled_xyxy_with_contiguous_labels(tmp_path, image_file):
    coco_set(tmp_path, image_file)
    ds = calib.get_dataset("coco", "val", root=tmp_path, use_all=True, image_size=80)
    assert (ds.task, ds.num_classes, ds.class_names, ds.image_size) == ("detection", 2, ["cat", "dog"], 80)
    image, target = ds[0]
    assert image.shape == (3, 80, 80), f"resized to image_size, got {image.shape}"
    expected = torch.tensor([[8.0, 8.0, 48.0, 48.0], [0.0, 0.0, 80.0, 80.0]])
    assert torch.allclose(target["boxes"], expected), f"xywh -> xyxy scaled by (2, 8/3): {target['boxes']}"
    assert target["labels"].tolist() == [1, 0], "category 7 -> 1 ('dog'), 3 -> 0 ('cat'); crowd skipped"
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64, "dtypes"
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,), "image without annotations kept"
    images, targets = calib.collate_detection([ds[0], ds[1]])
    assert images.shape == (2, 3, 80, 80) and len(targets) == 2, "collate"


def test_split_subfolders_with_own_json(tmp_path, image_file):
    coco_set(tmp_path / "train", image_file)
    coco_set(tmp_path / "val", image_file, annotations=[])
    assert len(calib.get_dataset("coco", "train", root=tmp_path)) == 2, "train/ used whole"
    assert len(calib.get_dataset("coco", "calib", root=tmp_path)) == 2, "calib falls back to train/"
    ds = calib.get_dataset("coco", "val", root=tmp_path)
    assert ds.image_size == 320 and len(ds[0][1]["boxes"]) == 0, "val/ read from its own json; default 320 px"


def test_annotations_option_and_images_subfolder(tmp_path, image_file):
    ann = coco_set(tmp_path / "images", image_file)
    ann.rename(tmp_path / "instances.json")
    ds = calib.get_dataset("coco", "train", root=tmp_path, annotations="instances.json", use_all=True)
    assert ds.records[0].image == tmp_path / "images" / "a.png", "file names resolve under images/"


def ann(image_id: int = 1, category: int = 7, bbox: list | None = None) -> dict:
    """One annotation (id 5)."""
    return {"id": 5, "image_id": image_id, "category_id": category, "bbox": bbox or [1, 1, 5, 5]}


@pytest.mark.parametrize(
    "annotation, rule",
    [
        (ann(bbox=[10, 10, 0, 5]), "has a box with width <= 0 ([10, 10, 0, 5])"),
        (ann(bbox=[10, 10, 5, -1]), "has a box with height <= 0"),
        (ann(bbox=[30, 10, 20, 5]), "has a box out of the image ([30, 10, 20, 5] in a 40x30 image)"),
        (ann(category=4), "has unknown category id 4 (categories: 3, 7)"),
        (ann(image_id=9), "refers to unknown image id 9"),
        (ann(bbox=[1, 1, 5]), ": malformed bbox [1, 1, 5]"),
        ({"id": 5, "image_id": 1, "bbox": [1, 1, 5, 5]}, "has no 'category_id'"),
    ],
)
def test_bad_annotation_names_file_and_rule(tmp_path, image_file, data_error, annotation, rule):
    path = coco_set(tmp_path, image_file, annotations=[annotation])
    build = lambda: calib.get_dataset("coco", "train", root=tmp_path, use_all=True)  # noqa: E731
    data_error(build, f"{path}: annotation 0 (id 5)", rule)


def test_malformed_json(tmp_path, image_file, data_error):
    ann = coco_set(tmp_path, image_file)
    build = lambda: calib.get_dataset("coco", "train", root=tmp_path)  # noqa: E731
    ann.write_text('{"images": [,]}')
    data_error(build, f"{ann}: malformed JSON", "line 1 column")
    ann.write_text('{"images": []}')
    data_error(build, f"{ann}: malformed COCO json", "'annotations'")


def test_missing_image_file(tmp_path, image_file, data_error):
    ann = coco_set(tmp_path, image_file)
    (tmp_path / "b.png").unlink()
    data_error(lambda: calib.get_dataset("coco", "train", root=tmp_path), f"{ann}: image 'b.png' (id 2) not found")


def test_missing_path_and_json(tmp_path, image_file, data_error):
    build = lambda root, **options: lambda: calib.get_dataset("coco", "train", root=root, **options)  # noqa: E731
    data_error(build(tmp_path / "x"), f"{tmp_path / 'x'}: path does not exist")
    image_file(tmp_path / "a.png")
    data_error(build(tmp_path), f"{tmp_path}: expected one COCO annotation .json")
    data_error(build(tmp_path, annotations="gone.json"), f"{tmp_path / 'gone.json'}: path does not exist")


def test_annotated_size_must_match_the_file(tmp_path, image_file, data_error):
    coco_set(tmp_path, image_file)
    image_file(tmp_path / "a.png", size=(30, 40))
    ds = calib.get_dataset("coco", "train", root=tmp_path, use_all=True)
    data_error(lambda: ds[0], f"{tmp_path / 'a.png'}: image is 30x40 but its annotation says 40x30")
