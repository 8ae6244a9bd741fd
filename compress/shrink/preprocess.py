"""How calibration images are prepared for a model: size, resize/crop and mean/std, as the model expects.

Datasets give float32 [3, H, W] images in [0, 1] (the data contract). Models differ in what they take:
- `timm:` models: their data config (`timm.data.resolve_data_config`): input size, interpolation, centre
  crop (crop_pct) and mean/std;
- `torchvision:` classifiers: the ImageNet evaluation transform (resize to size / 0.875, centre crop,
  bilinear, ImageNet mean/std);
- `torchvision:` detectors normalise and resize inside (their GeneralizedRCNNTransform): images pass as
  they are;
- `compress:` models (and `file:` ones) take [0, 1] images and centre/normalise inside.
`--image-size`, `--mean` and `--std` override any of these. The result is recorded in the artifact's
manifest under `preprocessing`, so `compress eval` (and any user) feeds the model the same way.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What is done to a [0, 1] image before the model sees it."""

    source: str  # where the settings came from, in words
    image_size: int | None  # square side after resize/crop; None: images keep their size
    mean: tuple[float, ...] | None = None  # None: no normalisation outside the model
    std: tuple[float, ...] | None = None
    crop_pct: float = 1.0  # classification: resize the shorter side to size / crop_pct, then centre crop
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)

    def describe(self) -> str:
        size = "as given" if self.image_size is None else f"{self.image_size}x{self.image_size}"
        steps = [f"size {size}"]
        if self.image_size is not None and self.crop_pct < 1.0:
            steps.append(f"resize to {resize_side(self.image_size, self.crop_pct)} then centre crop "
                         f"(crop_pct {self.crop_pct:g}, {self.interpolation})")
        if self.mean is None and self.std is None:
            steps.append("no mean/std outside the model")
        else:
            steps.append(f"mean {_fmt(self.mean)} std {_fmt(self.std)}")
        return f"{self.source}: " + ", ".join(steps)

    def apply(self, image: torch.Tensor, crop: bool = True) -> tuple[torch.Tensor, float, tuple[float, float]]:
        """One [3, H, W] image -> (prepared image, scale, (x offset, y offset)) so that a box maps as
        box * scale - offset. `crop=False` (detection) resizes to the square size without cropping."""
        scale, offset = 1.0, (0.0, 0.0)
        if self.image_size is not None:
            h, w = image.shape[-2:]
            if crop and self.crop_pct < 1.0 or crop and h != w:
                side = resize_side(self.image_size, self.crop_pct if crop else 1.0)
                scale = side / min(h, w)
                new_h, new_w = max(side, round(h * scale)), max(side, round(w * scale))
                image = _resize(image, new_h, new_w, self.interpolation)
                top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
                image = image[:, top:top + self.image_size, left:left + self.image_size]
                offset = (float(left), float(top))
            elif (h, w) != (self.image_size, self.image_size):
                scale = self.image_size / h  # square images (detection sets are square: the contract)
                image = _resize(image, self.image_size, self.image_size, self.interpolation)
        if self.mean is not None or self.std is not None:
            mean = torch.tensor(self.mean or (0.0,), dtype=image.dtype).view(-1, 1, 1)
            std = torch.tensor(self.std or (1.0,), dtype=image.dtype).view(-1, 1, 1)
            image = (image - mean) / std
        return image, scale, offset


def resize_side(size: int, crop_pct: float) -> int:
    return int(math.floor(size / crop_pct))


def _resize(image: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    out = F.interpolate(image[None], size=(h, w), mode=mode, **kwargs)[0]
    return out.clamp(0.0, 1.0) if mode == "bicubic" else out


def _fmt(values: Sequence[float] | None) -> str:
    return "-" if values is None else "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """`--mean 0.485,0.456,0.406` (or one value for all channels) -> a tuple of 3 floats."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise UserError(f"{option} {text!r}: write 3 numbers separated by commas, e.g. 0.485,0.456,0.406") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UserError(f"{option} {text!r}: expected 1 or 3 values (one per RGB channel), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{option} {text!r}: every value must be a finite number")
    if option == "--std" and any(v <= 0 for v in values):
        raise UserError(f"--std {text!r}: every value must be > 0")
    return values


def model_default(spec: str, model: nn.Module, task: str, dataset_size: int | None) -> Preprocessing:
    """The preprocessing the model's family expects (before user overrides)."""
    prefix = str(spec).partition(":")[0]
    from compress.models.protocol import is_torchvision_detector

    if prefix == "timm":
        import timm.data

        config = timm.data.resolve_data_config({}, model=model)
        size = int(config["input_size"][-1])
        crop = float(config.get("crop_pct") or 1.0) if task == "classification" else 1.0
        return Preprocessing(f"timm data config of {spec.partition(':')[2]}", size, tuple(config["mean"]),
                             tuple(config["std"]), crop, str(config.get("interpolation") or "bilinear"))
    if prefix == "torchvision" and is_torchvision_detector(model):
        return Preprocessing("torchvision detector (normalises and resizes inside its transform)", dataset_size)
    if prefix == "torchvision":
        return Preprocessing("torchvision ImageNet evaluation transform", 224, IMAGENET_MEAN, IMAGENET_STD, 0.875)
    return Preprocessing(f"{prefix}: model (takes [0, 1] images; any normalisation is inside the model)", dataset_size)


def resolve(spec: str, model: nn.Module, task: str, dataset_size: int | None, image_size: int | None = None,
            mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Preprocessing:
    """The model's default with the user's overrides; the source says which parts were overridden."""
    base = model_default(spec, model, task, dataset_size)
    changed = [name for name, value in (("image size", image_size), ("mean", mean), ("std", std)) if value is not None]
    if not changed:
        return base
    if image_size is not None and image_size <= 0:
        raise UserError(f"--image-size must be > 0 (got {image_size})")
    if image_size is not None and image_size > 8192:
        raise UserError(f"--image-size {image_size} is over the limit of 8192 pixels")
    return Preprocessing(f"{base.source}, {' and '.join(changed)} from the command line",
                         image_size if image_size is not None else base.image_size,
                         mean if mean is not None else base.mean, std if std is not None else base.std,
                         base.crop_pct, base.interpolation)
