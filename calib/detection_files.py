"""What the file-based detection sources (coco, yolo, voc) share: records, box checks, the dataset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from calib.errors import DataError
from calib.images import load_image
from calib.splits import select_by_hash

DEFAULT_IMAGE_SIZE = 320
BOX_TOLERANCE_PX = 1.0


@dataclass
class Record:
    """One annotated image: boxes xyxy normalised to [0, 1] by the image's width and height."""

    image: Path
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    size: tuple[int, int] | None = None  # (width, height) the annotation states, checked on load


def normalise_box(
    xyxy: Sequence[float],
    width: float,
    height: float,
    where: str,
    given: Sequence[float],
    tolerance: float = BOX_TOLERANCE_PX,
) -> list[float]:
    """Check an xyxy box against its image and return it clipped and divided by the image size.

    `where` starts the error ("ann.json: annotation 3"); `given` is the box as written in the file.
    Boxes may poke out of the image by `tolerance` (rounding in annotation tools), no more.
    """
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    shown = "[" + ", ".join(f"{v:g}" for v in given) + "]"
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise DataError(f"{where} has a box with a non-finite coordinate ({shown})")
    if x2 - x1 <= 0:
        raise DataError(f"{where} has a box with width <= 0 ({shown})")
    if y2 - y1 <= 0:
        raise DataError(f"{where} has a box with height <= 0 ({shown})")
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        frame = f"in a {width:g}x{height:g} image" if (width, height) != (1.0, 1.0) else "normalised to [0, 1]"
        raise DataError(f"{where} has a box out of the image ({shown} {frame})")
    return [max(x1, 0.0) / width, max(y1, 0.0) / height, min(x2, width) / width, min(y2, height) / height]


def check_label(label: int, num_classes: int, where: str, origin: str) -> int:
    """A class id, which must lie in [0, num_classes)."""
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: class id {label} out of range [0, {num_classes}) (classes from {origin})")
    return label


def make_record(
    image: Path, boxes: list[list[float]], labels: list[int], size: tuple[int, int] | None = None
) -> Record:
    """Record from python lists of normalised boxes and labels."""
    return Record(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), size)


def pick_split(records: list[Record], keys: list[str], split: str, use_all: bool, where: Path | str) -> list[Record]:
    """The records of `split` by hash of their keys (see calib.splits.select_by_hash)."""
    return [records[i] for i in select_by_hash(keys, split, use_all, where)]


class DetectionFiles(Dataset):
    """Annotated image files: items are (float32 [3, S, S], {"boxes": [N, 4] xyxy pixels, "labels": [N]})."""

    task = "detection"

    def __init__(self, records: list[Record], class_names: list[str], image_size: int):
        if not records:
            raise DataError("detection dataset has no images")
        self.records = records
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def check_images(self) -> None:
        """Decode every image once (runs call this before training): a damaged file fails before epoch 1."""
        from calib.images import check_decodes

        for record in self.records:
            check_decodes(record.image, self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        image, original = load_image(record.image, self.image_size)
        if record.size is not None and tuple(original) != tuple(record.size):
            w, h = record.size
            raise DataError(
                f"{record.image}: image is {original[0]}x{original[1]} but its annotation says {w:g}x{h:g}"
            )
        target = {
            "boxes": torch.from_numpy(record.boxes * np.float32(self.image_size)),
            "labels": torch.from_numpy(record.labels.copy()),
        }
        return image, target
