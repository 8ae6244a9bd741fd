"""`digits`: scikit-learn's 1,797 handwritten 8x8 digits as 32x32 RGB images, for classification."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from calib.registry import register_source
from calib.splits import digits_split_indices

IMAGE_SIZE = 32
CLASS_NAMES = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits: images float64 [1797, 8, 8] with values 0..16, and int64 labels [1797]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@lru_cache(maxsize=64)
def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] matrix M with M @ x the bilinear resize of x (align_corners=False, as torch)."""
    pos = np.maximum((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0)
    lo = np.minimum(np.floor(pos).astype(int), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    np.add.at(m, (np.arange(dst), lo), 1.0 - frac)
    np.add.at(m, (np.arange(dst), hi), frac)
    return m


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of square images [..., n, n] to [..., size, size]."""
    m = bilinear_matrix(images.shape[-1], size)
    return m @ images @ m.T


class Digits(Dataset):
    """One split of the digits: items are (float32 [3, 32, 32] in [0, 1], label)."""

    task = "classification"
    num_classes = 10
    class_names = CLASS_NAMES
    image_size = IMAGE_SIZE

    def __init__(self, split: str):
        images, labels = raw_digits()
        self.split = split
        self.source_digits = digits_split_indices(len(images), split)
        grey = upsample(images[self.source_digits] / 16.0, IMAGE_SIZE).astype(np.float32)
        self.images = torch.from_numpy(np.clip(grey, 0.0, 1.0))[:, None].expand(-1, 3, -1, -1)
        self.labels = labels[self.source_digits]

    def __len__(self) -> int:
        return len(self.source_digits)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), int(self.labels[index])


@register_source("digits")
def digits(split: str) -> Digits:
    """The bundled digits (val 360, calib 180, train 1,257; disjoint, fixed seed)."""
    return Digits(split)
