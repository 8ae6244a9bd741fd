"""Cache of generated arrays under $COMPRESS_CACHE, written atomically so concurrent builders are safe."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """Root of the cache: $COMPRESS_CACHE, or ~/.cache/compress."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress").expanduser()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to `path` via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays stored at `path`, or None when the file is missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (FileNotFoundError, OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
