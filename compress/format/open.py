"""Open any file a user may hand the CLI: an artifact or a stage checkpoint, each refused with its reader's own
reason (checksum, version, truncation) and never running code the file names."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.format.artifact import load, read_artifact
from compress.format.header import FORMAT, MAX_HEADER_BYTES, check_header
from compress.format.validate import _fail, load_stage_checkpoint, read_stage_checkpoint

__all__ = ["file_kind", "load_any"]


def file_kind(path: str | Path) -> str:
    """"artifact", "checkpoint" or "other" from the header's metadata (the header checked as load does)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(str(path), "file not found")
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            if length <= MAX_HEADER_BYTES:
                head += handle.read(length)
    try:
        metadata = json.loads(head[8:].decode("utf-8")).get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError):
        check_header(path, path.read_bytes())  # raises the precise reason
        metadata = {}
    if not isinstance(metadata, dict):
        return "other"
    if str(metadata.get("format", "")).startswith(f"{FORMAT}/"):
        return "artifact"
    return "checkpoint" if "compress.model_spec" in metadata else "other"


def load_any(path: str | Path, model_file: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model, manifest) of an artifact or of a stage checkpoint (manifest {"model", "model_meta"} then), each
    refused with its reader's own reason. A `file:` model is built only from `model_file`, the user's."""
    kind = file_kind(path)
    if kind == "artifact":
        _, manifest = read_artifact(path)
        return load(path, model_file=model_file), manifest
    if kind == "checkpoint":
        _, spec, meta = read_stage_checkpoint(path, allow_build="*")
        allow = None
        build = spec["build"]
        if build.startswith("file:") and model_file is not None:
            named = Path(build[len("file:"):].rsplit(":", 1)[0]).expanduser()
            if named.resolve() != Path(model_file).expanduser().resolve():
                raise _fail(str(path), f"model.build {build!r} names another file than --model-file {model_file}")
            allow = build
        model, meta = load_stage_checkpoint(path, allow)
        return model, {"model": spec, "model_meta": meta}
    # neither: say why as the artifact reader would
    read_artifact(path)
    raise _fail(str(path), "neither a compress artifact nor a stage checkpoint of a run")
