"""Where the bytes of an artifact go: header, manifest, and tensor bytes by kind (for `compress inspect
--manifest` and benchmarks). The file is read and validated as `compress.load` reads it (nothing is built)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["KINDS", "byte_breakdown", "tensor_kind", "index_coding"]

KINDS = ("header", "manifest", "indices_raw", "indices_coded", "codebooks", "scales", "biases", "bn", "other_float",
         "other")
QUANT_SIDE = ("_scale", "_offset", "_group_ids", "_order", "_absmax", "_absmax_scale", "_absmax_offset")


def tensor_kind(name: str, names: set[str], dtype_is_float: bool) -> str:
    """The kind of a stored tensor (indices counted as `indices_raw`; the caller knows which are coded)."""
    if name.endswith("_packed"):
        return "indices_raw"
    if name.endswith("_codebook"):
        return "codebooks"
    if name.endswith(QUANT_SIDE):
        return "scales"
    prefix = name.rsplit(".", 1)[0] if "." in name else ""
    if f"{prefix}.running_mean" in names or f"{prefix}.running_var" in names:
        return "bn"
    if name.endswith(".bias") or name == "bias":
        return "biases"
    return "other_float" if dtype_is_float else "other"


def _stored_sizes(tensors: dict[str, Any], layout: dict[str, Any]) -> dict[str, tuple[int, bool]]:
    """name -> (bytes the file stores for it, rANS-coded?): the index's lengths (version 2), else the raw size."""
    stored = {name: (t.numel() * t.element_size(), False) for name, t in tensors.items()}
    for entry in (layout.get("index") or {}).get("tensors", []):
        stored[entry[0]] = (entry[3], len(entry) == 5 and entry[4].get("codec") == "rans")
    return stored


def byte_breakdown(path: str | Path) -> dict[str, int]:
    """Bytes of the file by part: `header` (the safetensors length word and JSON header, without a version-1
    manifest), `manifest` (as stored: compressed), then the tensor bytes as stored, by kind: `indices_raw`,
    `indices_coded` (entropy-coded packed indices), `codebooks`, `scales` (scales, offsets, group ids, row
    orders, NF4 absmax), `biases`, `bn` (BatchNorm weights, biases and statistics), `other_float`, `other`;
    plus `file` (the file's size, the sum of all the others) and `version`."""
    from compress.format.artifact import read_artifact_parts

    path = Path(path)
    tensors, _, layout = read_artifact_parts(path)
    out = dict.fromkeys(KINDS, 0)
    if layout["version"] == 1:
        out["header"] = layout["header_bytes"] - layout["manifest_bytes"]
    else:
        out["header"] = layout["header_bytes"]
    out["manifest"] = layout["manifest_bytes"]
    names = set(tensors)
    for name, (size, coded) in _stored_sizes(tensors, layout).items():
        kind = "indices_coded" if coded else tensor_kind(name, names, tensors[name].is_floating_point())
        out[kind] += size
    out["file"] = path.stat().st_size
    out["version"] = layout["version"]
    return out


def index_coding(path: str | Path) -> dict[int, dict[str, int]]:
    """Per index bit width (from the manifest's quantization plan): packed bytes `raw`, bytes as `stored`
    (coded streams where coded), the number of `tensors` and of those `coded`."""
    from compress.format.artifact import read_artifact_parts
    from compress.format.container import coding_plan

    tensors, manifest, layout = read_artifact_parts(path)
    stored = _stored_sizes(tensors, layout)  # packed index tensors are U8: bytes == elements
    out: dict[int, dict[str, Any]] = {}
    for name, (bits, _) in sorted(coding_plan(manifest).items()):
        if name not in tensors:
            continue
        row = out.setdefault(bits, {"tensors": 0, "coded": 0, "raw": 0, "stored": 0})
        row["tensors"] += 1
        row["coded"] += int(stored[name][1])
        row["raw"] += tensors[name].numel()
        row["stored"] += stored[name][0]
    return dict(sorted(out.items()))
