"""The generated `digits-detect` source: splits, determinism, cache, and boxes that fit the glyphs."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import calib
from calib import digits_detect
from calib.digits import raw_digits
from calib.digits_detect import DIGIT_SIDE, LUMA, MAX_IOU, box_overlaps, image_rng, render_image
from calib.splits import digits_split_indices


def digest(ds) -> str:
    """A hash of every array of a built split."""
    h = hashlib.sha256()
    for array in (ds.images, ds.boxes, ds.labels, ds.digits, ds.offsets, ds.photos):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def assert_disjoint_pools(sets: dict[str, object]) -> None:
    """Every split pastes only digits of its own `digits` split, so no two splits share a digit image."""
    used = {s: set(ds.digits.tolist()) for s, ds in sets.items()}
    for split, ds in sets.items():
        pool = set(digits_split_indices(1797, split).tolist())
        assert used[split] <= pool, f"{split} uses digits outside its pool: {sorted(used[split] - pool)[:5]}"
        assert all(len(d) >= 1 for d in ds.source_digits), f"{split}: every image needs a digit"
    assert not used["train"] & used["val"], "train and val images share source digits"
    assert not used["train"] & used["calib"], "train and calib images share source digits"
    assert not used["val"] & used["calib"], "val and calib images share source digits"


def test_small_splits_use_disjoint_digit_pools():
    sets = {s: calib.get_dataset("digits-detect", s, num_images=40) for s in calib.SPLITS}
    assert {s: len(ds) for s, ds in sets.items()} == {s: 40 for s in calib.SPLITS}, "num_images override"
    assert_disjoint_pools(sets)


@pytest.mark.slow
def test_default_split_sizes_and_disjointness():
    sets = {s: calib.get_dataset("digits-detect", s) for s in calib.SPLITS}
    sizes = {s: len(ds) for s, ds in sets.items()}
    assert sizes == {"train": 2000, "val": 300, "calib": 256}, f"default sizes {sizes}"
    assert all(ds.image_size == 128 for ds in sets.values()), "default image size is 128"
    assert_disjoint_pools(sets)
    counts = np.diff(sets["train"].offsets)
    assert counts.min() >= 1 and counts.max() <= 4, f"1..4 digits per image, got {counts.min()}..{counts.max()}"
    assert set(np.unique(sets["train"].labels).tolist()) == set(range(10)), "every class appears in train"


def test_items_follow_the_contract():
    ds = calib.get_dataset("digits-detect", "val", num_images=6, image_size=96)
    assert (ds.task, ds.num_classes, ds.image_size) == ("detection", 10, 96), "dataset attributes"
    image, target = ds[3]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32, f"{image.shape} {image.dtype}"
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0, "pixels in [0, 1]"
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4, f"{target['boxes']}"
    assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"]), "labels"
    digits = ds.source_digits[3]
    assert target["labels"].tolist() == raw_digits()[1][digits].tolist(), "labels must be the pasted digits'"


def test_boxes_are_valid_and_apart():
    ds = calib.get_dataset("digits-detect", "train", num_images=60)
    for i in range(len(ds)):
        boxes = ds[i][1]["boxes"].numpy()
        assert (boxes >= 0).all() and (boxes <= ds.image_size).all(), f"image {i}: box outside the image {boxes}"
        sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
        assert (sides > 0).all() and sides.max() <= DIGIT_SIDE[1], f"image {i}: box sides {sides}"
        for k in range(1, len(boxes)):
            iou, _ = box_overlaps(boxes[k], boxes[:k])
            assert iou.max() < MAX_IOU, f"image {i}: boxes overlap with IoU {iou.max():.3f}"


def test_boxes_are_tight_around_visible_glyphs():
    pool = digits_split_indices(1797, "val")
    contrasts = []
    for i in range(40):
        r = render_image(image_rng("val", 128, i), pool, 128)
        assert len(r.glyphs) == len(r.boxes) >= 1, f"image {i}: one glyph per box"
        for (x0, y0, alpha), box in zip(r.glyphs, r.boxes):
            mask = np.zeros((128, 128), bool)
            mask[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = alpha > 0
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            tight = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
            assert box.tolist() == tight, f"image {i}: box {box.tolist()} is not the glyph's tight box {tight}"
            ink = mask & (np.pad(alpha, ((y0, 128 - y0 - alpha.shape[0]), (x0, 128 - x0 - alpha.shape[1]))) > 0.9)
            luma = lambda im: im.astype(np.float32) @ LUMA / 255.0  # noqa: E731
            contrasts.append(np.abs(luma(r.image) - luma(r.background))[ink].mean())
    contrasts = np.array(contrasts)
    assert contrasts.min() > 0.15, f"a glyph is hard to see: luminance contrast {contrasts.min():.3f}"
    assert np.median(contrasts) > 0.3, f"glyphs are faint: median contrast {np.median(contrasts):.3f}"


def test_builds_are_deterministic_and_prefix_stable():
    a = digits_detect.build_split("calib", 128, 5)
    b = digits_detect.build_split("calib", 128, 5)
    for key in a:
        assert np.array_equal(a[key], b[key]), f"two builds differ in {key}"
    c = digits_detect.build_split("calib", 128, 3)
    n = int(c["offsets"][-1])
    assert np.array_equal(c["images"], a["images"][:3]) and np.array_equal(c["boxes"], a["boxes"][:n]), (
        "a smaller num_images must give a prefix of a larger one"
    )


def test_cache_hit_skips_the_build(cache: Path, monkeypatch: pytest.MonkeyPatch):
    first = calib.get_dataset("digits-detect", "val", num_images=4)
    assert first.cache_path is not None and first.cache_path.is_file(), "the build must be cached"
    assert first.cache_path.is_relative_to(cache), f"cache outside COMPRESS_CACHE: {first.cache_path}"
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name], "temp file left"

    def no_build(*args, **kwargs):
        raise AssertionError("build_split called although the cache holds this split")

    monkeypatch.setattr(digits_detect, "build_split", no_build)
    second = calib.get_dataset("digits-detect", "val", num_images=4)
    assert digest(second) == digest(first), "cached split differs from the built one"
    with pytest.raises(AssertionError, match="build_split called"):
        calib.get_dataset("digits-detect", "val", num_images=5)


def test_corrupt_cache_is_rebuilt():
    first = calib.get_dataset("digits-detect", "calib", num_images=3)
    first.cache_path.write_bytes(b"not an npz")
    again = calib.get_dataset("digits-detect", "calib", num_images=3)
    assert digest(again) == digest(first), "a corrupt cache file must be rebuilt to the same data"


def test_concurrent_builds_agree():
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(digest(calib.get_dataset("digits-detect", "val", num_images=3))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1], "concurrent builders must produce the same data"
    assert digest(calib.get_dataset("digits-detect", "val", num_images=3)) == results[0], "cache after the race"


@pytest.mark.slow
def test_another_process_builds_the_same_bytes(cache: Path, fresh_interpreter: dict):
    # the other process: the session's shared fresh interpreter (tests/compress/fresh_interpreter.py), which
    # digests build_split("train", 128, 6) under its own hash seed
    assert fresh_interpreter["returncode"] == 0, fresh_interpreter["stderr"][-2000:]
    here = digest_arrays(digits_detect.build_split("train", 128, 6))
    other = fresh_interpreter["result"]["digits_detect_train_6"]
    assert other == here, "another process (other hash seed) built different data"


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """A hash of a dict of arrays, in key order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def test_bad_options_are_named():
    with pytest.raises(calib.DataError, match=r"digits-detect.*image_size must be an integer >= 64 \(got 32\)"):
        calib.get_dataset("digits-detect", "val", image_size=32)
    with pytest.raises(calib.DataError, match=r"digits-detect.*num_images must be an integer >= 1 \(got 0\)"):
        calib.get_dataset("digits-detect", "val", num_images=0)


def test_collate_detection_stacks_images_and_keeps_targets():
    ds = calib.get_dataset("digits-detect", "val", num_images=3)
    images, targets = calib.collate_detection([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 128, 128), f"batch shape {images.shape}"
    assert [len(t["boxes"]) for t in targets] == [len(ds[i][1]["boxes"]) for i in range(3)], "targets kept in order"
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=calib.collate_detection)
    assert next(iter(loader))[0].shape == (2, 3, 128, 128), "works as a DataLoader collate_fn"
    with pytest.raises(ValueError, match="must share a shape"):
        calib.collate_detection([ds[0], (torch.zeros(3, 64, 64), ds[1][1])])
