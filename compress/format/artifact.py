"""Write and read compress artifacts; every way a file can be damaged becomes an ArtifactError.

Reading never trusts the file: the header length, JSON, dtypes, shapes and offsets are checked before
safetensors maps any tensor, the manifest and the tensor bytes carry SHA-256 sums, and the rebuilt model
must take every tensor exactly (names and shapes). Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.format.header import (DTYPES, FORMAT, FORMAT_VERSION, MAX_HEADER_BYTES,  # noqa: F401  (re-exported)
                                    MAX_MANIFEST_BYTES, READ_VERSIONS, ArtifactError, check_header, decode_manifest,
                                    tensors_sha256)

def library_versions() -> dict[str, str]:
    import safetensors

    from compress._version import __version__

    return {"compress": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def write_artifact(path: str | Path, model: nn.Module, manifest: dict[str, Any]) -> int:
    """Atomically write `model`'s tensors and `manifest` (JSON-able; must hold "model") to `path` in format
    version 2 (the compact container, compress/format/container.py); returns the file's size."""
    from compress.format.checkpoint import state_tensors

    return write_tensors(path, state_tensors(model), manifest)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any],
                  entropy_coding: bool = True) -> int:
    """`write_artifact` for a state dict: packed codebook indices entropy-coded where smaller (unless
    `entropy_coding` is off); byte-identical output for identical input."""
    from compress.format.checkpoint import atomic_save_safetensors
    from compress.format.container import coding_plan, pack_container

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    manifest = {**manifest, "format": FORMAT, "version": FORMAT_VERSION, "versions": library_versions(),
                "tensors_sha256": tensors_sha256(tensors), "tensor_count": len(tensors)}
    stored, metadata = pack_container(tensors, manifest, coding_plan(manifest) if entropy_coding else None)
    atomic_save_safetensors(path, stored, {"format": f"{FORMAT}/{FORMAT_VERSION}", **metadata})
    return path.stat().st_size


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validated tensors and manifest of an artifact file (format version 1 or 2)."""
    tensors, manifest, _ = read_artifact_parts(path)
    return tensors, manifest


def read_artifact_parts(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, manifest, layout) of an artifact; layout says how the file is laid out: `version`,
    `header_bytes` (8 + the safetensors header), `manifest_bytes` (the stored, compressed manifest) and, for
    version 2, `index` (the container's tensor index)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    raw = path.read_bytes()
    header, start = check_header(path, raw)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not str(metadata.get("format", "")).startswith(f"{FORMAT}/"):
        raise ArtifactError(f"{path}: not a compress artifact (no '{FORMAT}' format in the metadata)")
    version = metadata["format"].split("/", 1)[1]
    if version not in [str(v) for v in READ_VERSIONS]:
        raise ArtifactError(f"{path}: format version {version!r} is not supported by this compress "
                            f"(it reads versions {', '.join(map(str, READ_VERSIONS))}); upgrade compress or re-export")
    if version == "1":
        tensors, manifest = _read_v1(path, raw, metadata)
        layout = {"version": 1, "header_bytes": start, "manifest_bytes": len(str(metadata.get("manifest", "")))}
    else:
        from compress.format.container import MANIFEST, unpack_container

        tensors, manifest, index = unpack_container(path, header, raw, start)
        begin, end = header[MANIFEST]["data_offsets"]
        layout = {"version": 2, "header_bytes": start, "manifest_bytes": end - begin, "index": index}
    if manifest.get("version") != layout["version"] or isinstance(manifest.get("version"), bool):
        raise ArtifactError(f"{path}: manifest version {str(repr(manifest.get('version')))[:40]} does not match the "
                            f"file's format version {layout['version']}; the file is damaged or forged")
    if len(tensors) != manifest.get("tensor_count") or tensors_sha256(tensors) != manifest.get("tensors_sha256"):
        raise ArtifactError(f"{path}: tensor data checksum mismatch; the file is damaged")
    return tensors, manifest, layout


def _read_v1(path: Path, raw: bytes, metadata: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Version 1: every tensor under its own name, the manifest (zlib+base64) in the header's metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

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
