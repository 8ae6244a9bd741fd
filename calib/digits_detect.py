"""`digits-detect`: a detection set of digits pasted onto crops of scikit-image's bundled photographs.

Each split pastes only digits from the same split of `digits` (train images use train digits, etc.), so
train and val never share a digit image; the photographs are shared by all splits. Image i of a split is
drawn from its own seeded generator, so a smaller `num_images` gives a prefix of a larger one, and every
process builds the same bytes. Results are cached as .npz under $COMPRESS_CACHE, keyed by the parameters
and GENERATOR_VERSION (bump it whenever the output of the generator changes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from calib.cache import cache_dir, load_npz, save_npz
from calib.digits import CLASS_NAMES, raw_digits, upsample
from calib.errors import DataError
from calib.images import uint8_to_tensor
from calib.registry import register_source
from calib.splits import DIGITS_SPLIT_SEED, DIGITS_SPLIT_SIZES, digits_split_indices

GENERATOR_VERSION = 1
GENERATOR_SEED = 1729
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "page", "text", "horse", "moon", "clock", "cell", "cat",
)  # fmt: skip
DEFAULT_IMAGE_SIZE = 128
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 300, "calib": 256}
SPLIT_CODES = {"train": 0, "val": 1, "calib": 2}
DIGIT_SIDE = (16, 40)
MAX_DIGITS = 4
MAX_IOU = 0.1
MAX_COVER = 0.25
PLACEMENT_TRIES = 30
ALPHA_RAMP = (0.15, 0.6)
CROP_FRACTION = (0.4, 1.0)
MIN_CONTRAST = 0.35
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PALETTE = np.array(
    [[0, 0, 0], [255, 255, 255], [230, 25, 25], [255, 225, 25], [60, 180, 75], [0, 130, 200],
     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 0, 0], [0, 0, 128]],
    dtype=np.float32,
) / 255.0  # fmt: skip
CACHE_KEYS = ("images", "boxes", "labels", "digits", "offsets", "photos")


@dataclass
class Rendered:
    """One generated image with its annotations and what it was made of (for tests and previews)."""

    image: np.ndarray  # uint8 [S, S, 3]
    background: np.ndarray  # uint8 [S, S, 3], the photo crop before pasting
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int64 [N]
    digits: np.ndarray  # int64 [N], index into sklearn's load_digits()
    photo: int
    glyphs: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (x0, y0, alpha [s, s])


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The bundled photographs as uint8 RGB arrays [H, W, 3] (grey and binary ones repeated to RGB)."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return tuple(out)


def box_overlaps(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection over the smaller box, of one xyxy box [4] with each of boxes [N, 4] -> [N], [N]."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + areas - inter), inter / np.minimum(area, areas)


def glyph_alpha(digit: np.ndarray, side: int) -> np.ndarray:
    """Alpha [side, side] of an 8x8 digit (0..16): bilinear upsample, then a ramp that sharpens the
    blurry edges and sets the faint fringe (below ALPHA_RAMP[0]) to exactly 0."""
    ink = upsample(digit / 16.0, side)
    return np.clip((ink - ALPHA_RAMP[0]) / (ALPHA_RAMP[1] - ALPHA_RAMP[0]), 0.0, 1.0).astype(np.float32)


def pick_colour(rng: np.random.Generator, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A random palette colour visible on most of the glyph: luminance contrast >= MIN_CONTRAST on 80 %."""
    luma = (background @ LUMA)[alpha >= 0.5 * alpha.max()]
    distance = np.abs(luma[None, :] - (PALETTE @ LUMA)[:, None])
    contrast = np.partition(distance, len(luma) // 5, axis=1)[:, len(luma) // 5]
    candidates = np.flatnonzero(contrast >= MIN_CONTRAST)
    if len(candidates) == 0:
        return PALETTE[int(np.argmax(contrast))]
    return PALETTE[candidates[rng.integers(len(candidates))]]


@lru_cache(maxsize=1)
def photo_images() -> tuple[Image.Image, ...]:
    """The photographs as PIL images, so crops resize without copies."""
    return tuple(Image.fromarray(p) for p in photos())


def photo_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """A random square crop of a random photo, resized to [size, size, 3] uint8, and the photo index."""
    bank = photo_images()
    index = int(rng.integers(len(bank)))
    w, h = bank[index].size
    side = max(8, int(round(rng.uniform(*CROP_FRACTION) * min(h, w))))
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    box = (x, y, x + side, y + side)
    crop = np.asarray(bank[index].resize((size, size), Image.BILINEAR, box=box, reducing_gap=2.0))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), index


def render_image(rng: np.random.Generator, pool: np.ndarray, size: int) -> Rendered:
    """Paste 1..4 digits from `pool` (indices into load_digits) onto a photo crop; boxes are tight.

    Placements are retried until a box overlaps no earlier one by IoU >= MAX_IOU or covers >= MAX_COVER
    of the smaller box; a digit that finds no place is dropped (the first one always fits)."""
    digit_images, digit_labels = raw_digits()
    background, photo = photo_crop(rng, size)
    canvas = background.astype(np.float32) / 255.0
    boxes: list[np.ndarray] = []
    digits: list[int] = []
    glyphs: list[tuple[int, int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
        digit = int(pool[rng.integers(len(pool))])
        side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
        alpha = glyph_alpha(digit_images[digit], side)
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        tight = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            box = tight + np.array([x0, y0, x0, y0], dtype=np.float32)
            if not boxes:
                break
            iou, cover = box_overlaps(box, np.stack(boxes))
            if iou.max() < MAX_IOU and cover.max() < MAX_COVER:
                break
        else:
            continue
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        colour = pick_colour(rng, region, alpha)
        region += alpha[..., None] * (colour - region)
        boxes.append(box)
        digits.append(digit)
        glyphs.append((x0, y0, alpha))
    image = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    digit_ids = np.array(digits, dtype=np.int64)
    return Rendered(image, background, np.stack(boxes), digit_labels[digit_ids], digit_ids, photo, glyphs)


def image_rng(split: str, image_size: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a split: independent of num_images and of the process."""
    return np.random.default_rng([GENERATOR_SEED, SPLIT_CODES[split], image_size, index])


def build_split(split: str, image_size: int, num_images: int) -> dict[str, np.ndarray]:
    """Generate a split as flat arrays: images, boxes, labels, digits, per-image offsets, photos."""
    pool = digits_split_indices(len(raw_digits()[0]), split)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    boxes, labels, digits, counts, photo_ids = [], [], [], [], []
    for i in range(num_images):
        r = render_image(image_rng(split, image_size, i), pool, image_size)
        images[i] = r.image
        boxes.append(r.boxes)
        labels.append(r.labels)
        digits.append(r.digits)
        counts.append(len(r.labels))
        photo_ids.append(r.photo)
    return {
        "images": images,
        "boxes": np.concatenate(boxes).astype(np.float32),
        "labels": np.concatenate(labels).astype(np.int64),
        "digits": np.concatenate(digits).astype(np.int64),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "photos": np.array(photo_ids, dtype=np.int64),
    }


def cache_path(split: str, image_size: int, num_images: int) -> Path:
    """Cache file of a split: named by its parameters plus a hash of everything the output depends on."""
    params = {
        "version": GENERATOR_VERSION, "seed": GENERATOR_SEED, "split": split, "image_size": image_size,
        "num_images": num_images, "photos": PHOTOS, "digit_side": DIGIT_SIDE, "max_digits": MAX_DIGITS,
        "max_iou": MAX_IOU, "max_cover": MAX_COVER, "tries": PLACEMENT_TRIES, "alpha_ramp": ALPHA_RAMP,
        "crop": CROP_FRACTION, "min_contrast": MIN_CONTRAST, "palette": PALETTE.round(4).tolist(),
        "split_seed": DIGITS_SPLIT_SEED, "split_sizes": DIGITS_SPLIT_SIZES,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "digits-detect" / f"{split}-{image_size}px-{num_images}-{key}.npz"


class DigitsDetect(Dataset):
    """One split of digits-detect: items are (float32 [3, S, S], {"boxes": [N, 4] xyxy, "labels": [N]})."""

    task = "detection"
    num_classes = 10
    class_names = CLASS_NAMES

    def __init__(self, split: str, arrays: dict[str, np.ndarray], path: Path | None = None):
        self.split = split
        self.cache_path = path
        self.images = arrays["images"]
        self.boxes, self.labels = arrays["boxes"], arrays["labels"]
        self.digits, self.offsets, self.photos = arrays["digits"], arrays["offsets"], arrays["photos"]
        self.image_size = int(self.images.shape[1])

    @property
    def source_digits(self) -> list[np.ndarray]:
        """Per image, the indices (into load_digits) of the digits pasted on it."""
        return [self.digits[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if index < 0:
            index += len(self)
        a, b = self.offsets[index], self.offsets[index + 1]
        target = {
            "boxes": torch.from_numpy(self.boxes[a:b].copy()),
            "labels": torch.from_numpy(self.labels[a:b].copy()),
        }
        return uint8_to_tensor(self.images[index]), target


@register_source("digits-detect")
def digits_detect(split: str, image_size: int = DEFAULT_IMAGE_SIZE, num_images: int | None = None) -> DigitsDetect:
    """Generated digit detection (train 2000, val 300, calib 256 images of 128 px), built once and cached."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 64:
        raise DataError(f"source 'digits-detect' ({split}): image_size must be an integer >= 64 (got {image_size!r})")
    n = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"source 'digits-detect' ({split}): num_images must be an integer >= 1 (got {num_images!r})")
    path = cache_path(split, int(image_size), int(n))
    arrays = load_npz(path)
    if arrays is None or set(arrays) != set(CACHE_KEYS) or arrays["images"].shape[:2] != (n, image_size):
        arrays = build_split(split, int(image_size), int(n))
        save_npz(path, arrays)
    return DigitsDetect(split, arrays, path)
