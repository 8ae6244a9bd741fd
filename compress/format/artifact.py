"""Write and read compress artifacts; every way a file can be damaged becomes an ArtifactError.

Reading never trusts the file: the header length, JSON, dtypes, shapes and offsets are checked before
safetensors maps any tensor, the manifest and the tensor bytes carry SHA-256 sums, and the rebuilt model
must take every tensor exactly (names and shapes). Nothing is unpickled.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.format.header import (DTYPES, FORMAT, FORMAT_VERSION, MAX_HEADER_BYTES,  # noqa: F401  (re-exported)
                                    MAX_MANIFEST_BYTES, ArtifactError, check_header, decode_manifest, tensors_sha256)

def library_versions() -> dict[str, str]:
    import safetensors

    from compress._version import __version__

    return {"compress": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def write_artifact(path: str | Path, model: nn.Module, manifest: dict[str, Any]) -> int:
    """Atomically write `model`'s tensors and `manifest` (JSON-able; must hold "model") to `path`; returns its size."""
    from compress.format.checkpoint import atomic_save_safetensors, state_tensors

    path = Path(path)
    tensors = state_tensors(model)
    manifest = {**manifest, "format": FORMAT, "version": FORMAT_VERSION, "versions": library_versions(),
                "tensors_sha256": tensors_sha256(tensors), "tensor_count": len(tensors)}
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    # the manifest is repetitive JSON (per-layer shapes and layouts): zlib makes it ~10x smaller
    packed = base64.b64encode(zlib.compress(manifest_json.encode(), 9)).decode("ascii")
    metadata = {"format": f"{FORMAT}/{FORMAT_VERSION}", "manifest": packed, "manifest_encoding": "zlib+base64",
                "manifest_sha256": hashlib.sha256(manifest_json.encode()).hexdigest()}
    atomic_save_safetensors(path, tensors, metadata)
    return path.stat().st_size


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validated tensors and manifest of an artifact file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    raw = path.read_bytes()
    header, _ = check_header(path, raw)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not str(metadata.get("format", "")).startswith(f"{FORMAT}/"):
        raise ArtifactError(f"{path}: not a compress artifact (no '{FORMAT}' format in the metadata)")
    version = metadata["format"].split("/", 1)[1]
    if version != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: format version {version!r} is not supported by this compress "
                            f"(it reads version {FORMAT_VERSION}); upgrade compress or re-export")
    manifest_json = decode_manifest(path, metadata)
    if hashlib.sha256(manifest_json.encode()).hexdigest() != metadata.get("manifest_sha256"):
        raise ArtifactError(f"{path}: manifest checksum mismatch; the header is damaged")
    try:
        manifest = json.loads(manifest_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: the manifest is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: the manifest must be a JSON object (got {type(manifest).__name__})")
    try:
        tensors = load_bytes(raw)
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: safetensors refused the file ({exc})") from None
    if len(tensors) != manifest.get("tensor_count") or tensors_sha256(tensors) != manifest.get("tensors_sha256"):
        raise ArtifactError(f"{path}: tensor data checksum mismatch; the file is damaged")
    return tensors, manifest


def load(path: str | Path, device: str | torch.device = "cpu", materialize: bool = False,
         model_file: str | Path | None = None) -> nn.Module:
    """Rebuild the compressed model of an artifact: stock builder + recorded changes + stored tensors.

    Quantized layers stay compact and dequantize on the fly unless `materialize` asks for dense layers.
    Models built by `file:` builders need that same file again as `model_file`.
    """
    from compress.format.validate import build_validated, check_manifest

    tensors, manifest = read_artifact(path)
    check_manifest(manifest, tensors, str(path), model_file)  # every field, before anything is built
    model = build_validated(Path(path), manifest["model"], manifest.get("model_meta") or {}, tensors, model_file)
    if materialize:
        from compress.format.layers import materialize as to_dense

        model = to_dense(model)
    return model.to(device).eval()
