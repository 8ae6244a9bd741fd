"""Reading image files with PIL into the contract's float32 [3, S, S] tensors in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from calib.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image(path: Path) -> bool:
    """True for a visible file with an image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of `folder` (and its sub-folders when recursive), sorted for determinism."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image(p))


def check_image_size(value: object, where: str) -> int:
    """Validate an `image_size` option: a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{where}: option image_size must be a positive integer (got {value!r})")
    return int(value)


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image as float32 [3, size, size] in [0, 1] (bilinear resize), and its original (width, height)."""
    try:
        with Image.open(path) as img:
            original = img.size
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return uint8_to_tensor(np.asarray(rgb)), original


def uint8_to_tensor(hwc: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] array -> float32 [3, H, W] tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))).float().div_(255.0)
