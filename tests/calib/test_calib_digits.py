"""The `digits` classification source: split sizes, disjointness, image format, determinism."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import calib
from calib.digits import raw_digits, upsample


def test_split_sizes_disjoint_and_covering():
    splits = {s: calib.get_dataset("digits", s) for s in calib.SPLITS}
    sizes = {s: len(ds) for s, ds in splits.items()}
    assert sizes == {"train": 1257, "val": 360, "calib": 180}, f"split sizes {sizes}"
    indices = {s: set(ds.source_digits.tolist()) for s, ds in splits.items()}
    assert not indices["train"] & indices["val"], "train and val share digits"
    assert not indices["train"] & indices["calib"], "train and calib share digits"
    assert not indices["val"] & indices["calib"], "val and calib share digits"
    assert set.union(*indices.values()) == set(range(1797)), "splits must cover all 1,797 digits"


def test_items_follow_the_contract():
    ds = calib.get_dataset("digits", "val")
    image, label = ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32, f"{image.shape} {image.dtype}"
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0, "pixels must lie in [0, 1]"
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2]), "grey repeated to 3 channels"
    assert isinstance(label, int) and 0 <= label < 10, f"label {label!r}"
    digits, labels = raw_digits()
    k = int(ds.source_digits[5])
    assert label == labels[k], "label must be the source digit's"
    expected = F.interpolate(torch.tensor(digits[k] / 16.0)[None, None], size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(image[0], expected[0, 0].float(), atol=1e-6), "image must be the bilinear 32x32 upsample"
    image.fill_(0)
    assert float(ds[5][0].max()) > 0, "items must be copies: editing one must not change the dataset"


def test_builds_are_identical():
    a, b = calib.get_dataset("digits", "calib"), calib.get_dataset("digits", "calib")
    assert np.array_equal(a.source_digits, b.source_digits) and torch.equal(a.images, b.images), "not deterministic"


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(0).random((3, 8, 8))
    for size in (16, 23, 40):
        ref = F.interpolate(torch.tensor(x)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        assert np.allclose(upsample(x, size), ref.numpy(), atol=1e-12), f"upsample to {size} differs from torch"
