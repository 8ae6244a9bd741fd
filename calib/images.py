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


MAX_PIXELS = 100_000_000  # e.g. 10000 x 10000; a larger header is refused before anything is decoded


def _open(path: Path) -> Image.Image:
    """Image.open with the pixel cap checked from the header (PIL's own bomb error becomes a DataError)."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to decode ({' '.join(str(e).split())[:120]}); the limit is "
                        f"{MAX_PIXELS:,} pixels") from None
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise DataError(f"{path}: image of {width}x{height} pixels is over the limit of {MAX_PIXELS:,} pixels; "
                        "refused (damaged or hostile file?)")
    return img


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    with _open(path) as img:
        return img.size


def check_decodes(path: Path, size: int | None = None) -> None:
    """Decode the whole file (a truncated JPEG fails here, not epochs later); JPEGs decode at reduced scale."""
    with _open(path) as img:
        try:
            if size:
                img.draft("RGB", (size, size))
            img.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None


def safe_relative(name: str, where: str) -> str:
    """A file name read from an annotation: relative, without '..', so it stays inside the dataset's folder."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\x00" in name or name.startswith("~"):
        raise DataError(f"{where}: file name {name!r} points outside the dataset folder; refused")
    return name


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image as float32 [3, size, size] in [0, 1] (bilinear resize), and its original (width, height)."""
    try:
        with _open(path) as img:
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
