"""Write and read compress artifacts; every way a file can be damaged becomes an ArtifactError.

Reading never trusts the file: the header length, JSON, dtypes, shapes and offsets are checked before
safetensors maps any tensor, the manifest and the tensor bytes carry SHA-256 sums, and the rebuilt model
must take every tensor exactly (names and shapes). Nothing is unpickled.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import UserError

FORMAT = "compress-artifact"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap
MAX_MANIFEST_BYTES = 64_000_000  # the manifest once inflated (a real one is kilobytes)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class ArtifactError(UserError):
    """A file that is not a valid compress artifact (damaged, hostile, foreign or of an unknown version)."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (independent of file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import safetensors

    import compress

    return {"compress": compress.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def write_artifact(path: str | Path, model: nn.Module, manifest: dict[str, Any]) -> int:
    """Atomically write `model`'s tensors and `manifest` (JSON-able; must hold "model") to `path`; returns its size."""
    from compress.checkpoint import atomic_save_safetensors, state_tensors

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


def _check_header(path: Path, raw: bytes) -> tuple[dict[str, Any], int]:
    """Parse and validate the safetensors header; returns it and the data section's offset."""
    if len(raw) < 8:
        raise ArtifactError(f"{path}: {'empty file' if not raw else 'truncated file'} ({len(raw)} bytes); not an artifact")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(raw):
        raise ArtifactError(f"{path}: header length {header_len} is impossible for a file of {len(raw)} bytes "
                            "(damaged or not a safetensors file)")
    try:
        header = json.loads(raw[8: 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: header is not valid JSON ({exc.__class__.__name__}); the file is damaged") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: header is not a JSON object; the file is damaged")
    data_len = len(raw) - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES or not isinstance(info.get("shape"), list) \
                or not all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
                or not (isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                        and all(isinstance(o, int) for o in info["data_offsets"])):
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed header entry {str(info)[:120]}")
        begin, end = info["data_offsets"]
        itemsize = torch.empty(0, dtype=DTYPES[info["dtype"]]).element_size()
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(info["shape"]) * itemsize:
            raise ArtifactError(f"{path}: tensor {name!r} offsets {info['data_offsets']} do not fit its shape "
                                f"{info['shape']} or the file ({data_len} data bytes): truncated or damaged")
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise ArtifactError(f"{path}: tensor data has a gap or overlap at byte {begin}; the file is damaged")
        covered = end
    if covered != data_len:
        raise ArtifactError(f"{path}: {data_len - covered} bytes after the last tensor; truncated or damaged file")
    return header, 8 + header_len


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validated tensors and manifest of an artifact file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    raw = path.read_bytes()
    header, _ = _check_header(path, raw)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not str(metadata.get("format", "")).startswith(f"{FORMAT}/"):
        raise ArtifactError(f"{path}: not a compress artifact (no '{FORMAT}' format in the metadata)")
    version = metadata["format"].split("/", 1)[1]
    if version != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: format version {version!r} is not supported by this compress "
                            f"(it reads version {FORMAT_VERSION}); upgrade compress or re-export")
    manifest_json = _decode_manifest(path, metadata)
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


def _decode_manifest(path: Path, metadata: dict[str, str]) -> str:
    encoding = metadata.get("manifest_encoding", "json")
    raw = metadata.get("manifest", "")
    if not isinstance(raw, str):
        raise ArtifactError(f"{path}: the manifest must be a string in the metadata")
    if encoding == "json":
        return raw
    if encoding != "zlib+base64":
        raise ArtifactError(f"{path}: unknown manifest encoding {encoding!r}")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(base64.b64decode(raw.encode("ascii"), validate=True), MAX_MANIFEST_BYTES)
        if inflate.unconsumed_tail:  # a zlib bomb: more than the cap once inflated
            raise ArtifactError(f"{path}: the manifest inflates past {MAX_MANIFEST_BYTES:,} bytes; refused")
        return text.decode("utf-8")
    except (ValueError, zlib.error, UnicodeError, AttributeError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{path}: the manifest cannot be decoded ({exc.__class__.__name__}); the header is damaged") from None


def load(path: str | Path, device: str | torch.device = "cpu", materialize: bool = False,
         model_file: str | Path | None = None) -> nn.Module:
    """Rebuild the compressed model of an artifact: stock builder + recorded changes + stored tensors.

    Quantized layers stay compact and dequantize on the fly unless `materialize` asks for dense layers.
    Models built by `file:` builders need that same file again as `model_file`.
    """
    import compress.stages  # noqa: F401  (stages register the restorers of what they change)
    from compress.artifact.validate import check_manifest

    tensors, manifest = read_artifact(path)
    check_manifest(manifest, tensors, str(path), model_file)  # every field, before anything is built
    model = build_validated(Path(path), manifest["model"], manifest.get("model_meta") or {}, tensors, model_file)
    if materialize:
        from compress.quant import materialize as to_dense

        model = to_dense(model)
    return model.to(device).eval()


def build_validated(path: Path, spec: dict[str, Any], meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    model_file: str | Path | None = None) -> nn.Module:
    """The model of a validated spec and model_meta, checked against the tensors, which are then loaded."""
    from compress.artifact.validate import check_against_model, check_pruned_modules
    from compress.checkpoint import apply_restorers
    from compress.models import build_model

    build = spec["build"]
    if build.startswith("file:"):
        build = _rebuild_file_spec(path, build, spec, model_file)
    try:
        model = build_model(build, num_classes=spec["num_classes"], **(spec.get("options") or {}))
        model = apply_restorers(model, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ArtifactError(f"{path}: the manifest does not describe a buildable model ({reason})") from None
    check_pruned_modules(model, meta, str(path))
    check_against_model(model, tensors, str(path))
    model.load_state_dict(tensors, strict=True)
    return model


def _rebuild_file_spec(path: Path, build: str, spec: dict[str, Any], model_file: str | Path | None) -> str:
    if model_file is None:
        raise ArtifactError(f"{path}: the model was built by {build!r}; pass that file again (model_file=...) "
                            "to rebuild it")
    if not Path(model_file).is_file():
        raise ArtifactError(f"{path}: model file {model_file} not found")
    if not isinstance(spec.get("file_sha256"), str):
        raise ArtifactError(f"{path}: model.file_sha256 is missing; the file cannot be matched to {model_file}")
    digest = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    if digest != spec["file_sha256"]:
        raise ArtifactError(f"{path}: {model_file} is not the file the model was built from (sha256 differs)")
    return "file:" + str(model_file) + ":" + build.rsplit(":", 1)[1]
