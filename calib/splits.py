"""How every source divides its data into train / val / calib, deterministically and without overlap."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from calib.errors import DataError
from calib.registry import SPLITS

DIGITS_SPLIT_SEED = 0
DIGITS_SPLIT_SIZES = {"val": 360, "calib": 180}
HASH_FRACTIONS = {"val": 0.2, "calib": 0.1}


def digits_split_indices(num_digits: int, split: str) -> np.ndarray:
    """Sorted indices of the digits in `split`: a fixed-seed permutation cut into val, calib, then train."""
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(num_digits)
    n_val, n_calib = DIGITS_SPLIT_SIZES["val"], DIGITS_SPLIT_SIZES["calib"]
    parts = {"val": order[:n_val], "calib": order[n_val : n_val + n_calib], "train": order[n_val + n_calib :]}
    return np.sort(parts[split])


def hash_split(key: str) -> str:
    """Split of one file, from a hash of its relative path: val 20 %, calib 10 %, train the rest."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < HASH_FRACTIONS["val"]:
        return "val"
    if u < HASH_FRACTIONS["val"] + HASH_FRACTIONS["calib"]:
        return "calib"
    return "train"


def split_subfolders(root: Path) -> dict[str, Path]:
    """The train/ val/ calib/ subfolders of `root` that exist (empty when root is not split that way)."""
    return {s: root / s for s in SPLITS if (root / s).is_dir()}


def split_subfolder(root: Path, split: str) -> Path | None:
    """root/<split> when root is organised in split subfolders (calib falls back to train/), else None."""
    present = split_subfolders(root)
    if not present:
        return None
    if split in present:
        return present[split]
    if split == "calib" and "train" in present:
        return present["train"]
    raise DataError(
        f"{root}: has split sub-folders ({', '.join(s + '/' for s in present)}) but no '{split}/'; "
        f"add {root / split} or remove the split sub-folders to use a hash split"
    )


def select_by_hash(keys: list[str], split: str, use_all: bool, where: Path | str) -> list[int]:
    """Positions of `keys` that hash into `split` (all of them when use_all); raises if none do."""
    if use_all:
        chosen = list(range(len(keys)))
    else:
        chosen = [i for i, k in enumerate(keys) if hash_split(k) == split]
    if not chosen:
        raise DataError(
            f"{where}: split '{split}' is empty after the hash split of {len(keys)} file(s) "
            f"(val 20 %, calib 10 % by file name); add train/ val/ calib/ sub-folders or pass use_all=True"
        )
    return chosen
