"""The safetensors file under every artifact and stage checkpoint, checked before any tensor is mapped:
header length, JSON, dtypes, shapes, offsets; the artifact's format name and its (compressed) manifest."""
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

from compress.errors import UserError

FORMAT = "compress-artifact"
FORMAT_VERSION = 2  # what the writer produces: the compact container (compress/format/container.py)
READ_VERSIONS = (1, 2)  # what the reader accepts: 1 = every tensor under its own name, manifest in the header
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


def check_header(path: Path, raw: bytes) -> tuple[dict[str, Any], int]:
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


def decode_manifest(path: Path, metadata: dict[str, str]) -> str:
    encoding = metadata.get("manifest_encoding", "json")
    raw = metadata.get("manifest", "")
    if not isinstance(raw, str):
        raise ArtifactError(f"{path}: the manifest must be a string in the metadata")
    if encoding == "json":
        return raw
    if encoding != "zlib+base64":
        raise ArtifactError(f"{path}: unknown manifest encoding {encoding!r}")
    try:
        packed = base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, UnicodeError) as exc:
        raise ArtifactError(f"{path}: the manifest cannot be decoded ({exc.__class__.__name__}); the header is damaged") from None
    return inflate_text(path, packed, "the manifest")


def inflate_text(path: Path, packed: bytes, field: str, cap: int = MAX_MANIFEST_BYTES) -> str:
    """zlib-compressed UTF-8 text, refused when it inflates past `cap` bytes (a zlib bomb) or is damaged."""
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(packed, cap)
        if inflate.unconsumed_tail:  # a zlib bomb: more than the cap once inflated
            raise ArtifactError(f"{path}: {field} inflates past {cap:,} bytes; refused")
        if not inflate.eof or inflate.unused_data:
            raise ArtifactError(f"{path}: {field} is truncated or has trailing bytes; the file is damaged")
        return text.decode("utf-8")
    except (ValueError, zlib.error, UnicodeError) as exc:
        if isinstance(exc, ArtifactError):  # ours, from above (UserError is a ValueError)
            raise
        raise ArtifactError(f"{path}: {field} cannot be decoded ({exc.__class__.__name__}); the file is damaged") from None
