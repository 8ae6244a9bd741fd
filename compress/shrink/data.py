"""Calibration images for shrink: a registered data source or a folder of images, labels optional."""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from compress.errors import UserError
from compress.shrink.preprocess import Preprocessing, resize_side


class Prepared(Dataset):
    """Items of `base` (first `samples`) with `pre` applied, in the item form `task` expects.

    Classification items: (image, label or -1). Detection items: (image, {"boxes", "labels"}); an unlabelled
    or classification source gives empty targets (only the images are used for calibration).
    """

    def __init__(self, base: Dataset, pre: Preprocessing, task: str, samples: int | None = None) -> None:
        self.base, self.pre, self.task = base, pre, task
        self.length = len(base) if samples is None else min(samples, len(base))
        self.num_classes = getattr(base, "num_classes", 0)
        self.class_names = getattr(base, "class_names", [])
        self.image_size = pre.image_size or getattr(base, "image_size", None)
        self.base_task = getattr(base, "task", "classification")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, target = self.base[index]
        image, scale, (dx, dy) = self.pre.apply(image, crop=self.task == "classification")
        if self.task == "classification":
            if torch.is_tensor(target) and target.ndim == 0:
                target = target.item()
            return image, int(target) if isinstance(target, numbers.Integral) else -1
        if isinstance(target, dict):
            boxes = target["boxes"].float() * scale - torch.tensor([dx, dy, dx, dy])
            return image, {"boxes": boxes, "labels": target["labels"]}
        return image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def calib_ref(calib: str) -> dict[str, Any]:
    """A recipe `DataRef` (as a dict) for `--calib`: a folder of images, or SOURCE[:SPLIT] (split calib)."""
    from calib import list_sources

    if not str(calib).strip():
        raise UserError("--calib is empty: give a data source (digits, digits-detect:train, ...) or a folder of images")
    path = Path(calib).expanduser()
    if path.is_dir():
        return {"source": "folder", "split": "calib", "root": str(path), "options": {"use_all": True}}
    source, _, split = calib.partition(":")
    if source not in list_sources():
        from compress.errors import unknown_choice

        raise UserError(f"--calib {calib!r}: not a folder, and {unknown_choice('data source', source, list_sources())}")
    split = split or "calib"
    if split == "val":
        raise UserError(f"--calib {calib!r}: the val split is held back for evaluation; calibrate on calib or train")
    return {"source": source, "split": split}


def with_read_size(ref: dict[str, Any], pre: Preprocessing) -> dict[str, Any]:
    """A folder is read at the side the preprocessing resizes to (then centre-cropped); other sources as they are."""
    if ref["source"] != "folder" or pre.image_size is None:
        return ref
    return {**ref, "options": {**ref["options"], "image_size": resize_side(pre.image_size, pre.crop_pct)}}


def load_calib(ref: dict[str, Any], pre: Preprocessing, task: str, samples: int) -> Prepared:
    """The prepared calibration dataset of a DataRef dict."""
    from calib import get_dataset
    from calib.registry import source_options

    options = dict(ref.get("options", {}))
    if "samples" in source_options(ref["source"]) and "samples" not in options:
        options["samples"] = samples  # a source that makes as many images as asked (photos)
    base = get_dataset(ref["source"], ref["split"], root=ref.get("root"), **options)
    if len(base) == 0:
        raise UserError(f"--calib: {ref.get('root') or ref['source']} holds no images")
    return Prepared(base, pre, task, samples)
