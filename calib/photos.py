"""`photos`: real photographs that installed packages ship, as unlabelled random multi-scale crops.

No download: the photos are files inside scikit-image (`skimage/data`), scikit-learn
(`sklearn/datasets/images`) and matplotlib (`mpl-data/sample_data`). Only photographs are used (no
drawings, logos, phantoms or charts); grey photos are repeated on the three channels.

Splits are disjoint by source photo: `val` and `calib` never share a photo (the two motorcycle frames of
scikit-image's stereo pair count as one photo). `train` uses the calib photos with other crops (it is for
label-free recovery, never for evaluation). Each split yields `samples` crops: crop i takes photo
i mod (photos of the split), then a random square-ish window (area 10-100 % of the largest square of the
photo, aspect 3/4-4/3), a random horizontal flip, and is resized to `image_size`. Crop i depends only on
(seed, split, i), so the first N crops are the same whatever `samples` is.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from calib.errors import DataError
from calib.images import check_image_size
from calib.registry import register_source

# (name, package, path inside the package's data folder). Which split each photo belongs to is fixed here,
# so that both splits hold colour and grey photos, objects and textures.
PHOTOS: dict[str, list[tuple[str, str, str]]] = {
    "val": [
        ("chelsea", "skimage", "chelsea.png"),
        ("coffee", "skimage", "coffee.png"),
        ("rocket", "skimage", "rocket.jpg"),
        ("china", "sklearn", "china.jpg"),
        ("grace_hopper", "matplotlib", "grace_hopper.jpg"),
        ("camera", "skimage", "camera.png"),
        ("coins", "skimage", "coins.png"),
        ("clock_motion", "skimage", "clock_motion.png"),
        ("brick", "skimage", "brick.png"),
        ("hubble_deep_field", "skimage", "hubble_deep_field.jpg"),
    ],
    "calib": [
        ("astronaut", "skimage", "astronaut.png"),
        ("motorcycle_left", "skimage", "motorcycle_left.png"),
        ("motorcycle_right", "skimage", "motorcycle_right.png"),  # the same scene: same split as its pair
        ("flower", "sklearn", "flower.jpg"),
        ("text", "skimage", "text.png"),
        ("moon", "skimage", "moon.png"),
        ("grass", "skimage", "grass.png"),
        ("gravel", "skimage", "gravel.png"),
        ("retina", "skimage", "retina.jpg"),
        ("ihc", "skimage", "ihc.png"),
    ],
}
PHOTOS["train"] = PHOTOS["calib"]
DEFAULT_SAMPLES = 500
MIN_AREA, MAX_AREA = 0.10, 1.0
MIN_ASPECT, MAX_ASPECT = 3 / 4, 4 / 3
VERSION = 1  # of the crop generator: bump when crops change
DEFAULT_SEED = 0  # the crops' seed when none is given (benchmarks change it to vary calibration crops)


def package_folder(package: str) -> Path:
    """The folder where `package` keeps its bundled images."""
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data"
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images"
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data"
    raise DataError(f"photos: unknown package '{package}'")


@lru_cache(maxsize=32)
def load_photo(package: str, filename: str) -> torch.Tensor:
    """One photo as uint8 [3, H, W] (grey repeated on three channels, alpha dropped)."""
    from PIL import Image

    path = package_folder(package) / filename
    if not path.is_file():
        raise DataError(f"photos: {path} not found (is {package} installed?)")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    key = f"photos/{VERSION}/{seed}/{split}/{index}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random window: area a share of the largest square, aspect 3/4..4/3."""
    side = min(height, width)
    area = side * side * rng.uniform(MIN_AREA, MAX_AREA)
    aspect = math.exp(rng.uniform(math.log(MIN_ASPECT), math.log(MAX_ASPECT)))
    h = int(round(min(height, math.sqrt(area / aspect))))
    w = int(round(min(width, math.sqrt(area * aspect))))
    h, w = max(h, 1), max(w, 1)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w


class Photos(Dataset):
    """Unlabelled crops of one split's photos: items (float32 [3, S, S] in [0, 1], -1)."""

    task = "classification"
    num_classes = 0
    class_names: list[str] = []

    def __init__(self, split: str, samples: int = DEFAULT_SAMPLES, image_size: int = 224, seed: int = 0):
        where = f"source 'photos', split '{split}'"
        self.image_size = check_image_size(image_size, where)
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples <= 0:
            raise DataError(f"{where}: option samples must be a positive integer (got {samples!r})")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DataError(f"{where}: option seed must be an integer (got {seed!r})")
        self.split, self.samples, self.seed = split, int(samples), int(seed)
        self.photos = PHOTOS[split]

    @property
    def photo_names(self) -> list[str]:
        return [name for name, _, _ in self.photos]

    def __len__(self) -> int:
        return self.samples

    def source_photo(self, index: int) -> str:
        """The name of the photo crop `index` comes from."""
        return self.photos[index % len(self.photos)][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.samples:
            raise IndexError(index)
        _, package, filename = self.photos[index % len(self.photos)]
        photo = load_photo(package, filename)
        rng = _rng(self.seed, self.split, index)
        top, left, h, w = crop_box(photo.shape[1], photo.shape[2], rng)
        crop = photo[:, top:top + h, left:left + w].float().div_(255.0)
        if rng.uniform() < 0.5:
            crop = crop.flip(-1)
        size = self.image_size
        out = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        return out.clamp_(0.0, 1.0), -1


@register_source("photos")
def photos(split: str, samples: int = DEFAULT_SAMPLES, image_size: int = 224, seed: int | None = None) -> Photos:
    """Real photographs bundled with scikit-image, scikit-learn and matplotlib, as random crops (unlabelled;
    val and calib never share a photo)."""
    return Photos(split, samples, image_size, DEFAULT_SEED if seed is None else seed)
