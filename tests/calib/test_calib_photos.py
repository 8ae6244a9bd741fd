"""photos: real photographs of installed packages, disjoint splits by photo, deterministic crops."""
from __future__ import annotations

import pytest
import torch

from calib import DataError, get_dataset
from calib.photos import PHOTOS, load_photo


def test_val_and_calib_never_share_a_photo() -> None:
    val = {name for name, _, _ in PHOTOS["val"]}
    calib = {name for name, _, _ in PHOTOS["calib"]}
    train = {name for name, _, _ in PHOTOS["train"]}
    assert val and calib and not val & calib and not val & train
    # the two frames of the stereo pair are one scene: same split
    assert {"motorcycle_left", "motorcycle_right"} <= calib
    d = get_dataset("photos", "val", samples=30, image_size=16)
    assert {d.source_photo(i) for i in range(len(d))} == val


def test_every_photo_loads_offline_as_rgb() -> None:
    for split in ("val", "calib"):
        for _, package, filename in PHOTOS[split]:
            photo = load_photo(package, filename)
            assert photo.dtype == torch.uint8 and photo.shape[0] == 3 and min(photo.shape[1:]) >= 160


def test_crops_follow_the_contract_and_are_deterministic() -> None:
    a = get_dataset("photos", "calib", samples=12, image_size=40)
    b = get_dataset("photos", "calib", samples=5, image_size=40)
    assert len(a) == 12 and len(b) == 5
    assert a.task == "classification" and a.num_classes == 0 and a.image_size == 40
    x, label = a[3]
    assert label == -1 and x.dtype == torch.float32 and x.shape == (3, 40, 40)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # crop i depends on (seed, split, i) only: the first crops do not change with the number asked
    for i in range(5):
        assert torch.equal(a[i][0], b[i][0])
    # another seed gives other crops; two crops of the same photo differ (random windows and scales)
    c = get_dataset("photos", "calib", samples=12, image_size=40, seed=1)
    assert not torch.equal(a[0][0], c[0][0])
    n = len(PHOTOS["calib"])
    assert not torch.equal(a[0][0], a[n][0])
    with pytest.raises(IndexError):
        a[12]


def test_train_uses_calib_photos_with_other_crops() -> None:
    t = get_dataset("photos", "train", samples=2, image_size=24)
    c = get_dataset("photos", "calib", samples=2, image_size=24)
    assert t.source_photo(0) == c.source_photo(0) and not torch.equal(t[0][0], c[0][0])


def test_bad_options_are_data_errors() -> None:
    with pytest.raises(DataError, match="samples"):
        get_dataset("photos", "val", samples=0)
    with pytest.raises(DataError, match="image_size"):
        get_dataset("photos", "val", image_size=-3)
    with pytest.raises(DataError, match="unknown option 'sample'"):
        get_dataset("photos", "val", sample=3)
