"""Stage checkpoints: a model's tensors in safetensors plus the JSON needed to rebuild it without pickle.

The metadata holds the model spec (builder, classes, options) and `model_meta`: what stages did to the
architecture (e.g. the prune stage's shape manifest). The restorers of `compress.format.restorers` turn a
stock model into the changed one before the tensors are loaded, so no module object is ever unpickled.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save

from compress.format.header import tensors_sha256
from compress.format.validate import load_stage_checkpoint, read_stage_checkpoint

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, shared storage broken (safetensors needs it)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with a canonical header (`__metadata__` first with sorted keys, then the tensors in data
    order): safetensors writes the metadata from a Rust HashMap, in an order that changes from process to
    process, so equal models gave different bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    canonical = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    canonical.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename), readable by all (0644), byte-identical
    for identical inputs (see `canonical_safetensors`)."""
    atomic_write_bytes(Path(path), canonical_safetensors(save(tensors, metadata=metadata)))


def save_model(path: str | Path, model: nn.Module, model_spec: dict[str, Any], model_meta: dict[str, Any]) -> None:
    """Atomically write `model` to `path` (safetensors + JSON metadata)."""
    tensors = state_tensors(model)
    metadata = {"compress.model_spec": json.dumps(model_spec, sort_keys=True),
                "compress.model_meta": json.dumps(model_meta, sort_keys=True),
                "compress.tensors_sha256": tensors_sha256(tensors)}  # checked by load_model
    atomic_save_safetensors(path, tensors, metadata)


def read_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (model_spec, model_meta) stored in a stage checkpoint (after the checks of `load_model`)."""
    _, spec, meta = read_stage_checkpoint(path, allow_build="*")
    return spec, meta


def load_model(path: str | Path, allow_build: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a stage checkpoint: stock builder, recorded changes, then the tensors, after the
    artifact's checks (tensor checksum, every metadata field; compress.format.validate). A `file:` model is
    rebuilt only when its spec is exactly `allow_build` (the recipe's own): the file never names code."""

    return load_stage_checkpoint(path, allow_build)
