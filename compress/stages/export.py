"""The `export` stage: writes the run's model as one artifact, DIR/model.safetensors by default."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from pydantic import Field

from compress.format.artifact import write_artifact
from compress.config import Config
from compress.stages.spec import StageSpec

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class ExportConfig(Config):
    path: str = Field("model.safetensors", description="artifact path, relative to the run directory")


def artifact_manifest(ctx: RunContext) -> dict[str, Any]:
    """What a reader needs besides the tensors: builder, architecture changes, recipe, metrics."""
    spec = ctx.model_spec()
    if spec["build"].startswith("file:"):
        file_path = spec["build"][len("file:"):].rsplit(":", 1)[0]
        spec["file_sha256"] = hashlib.sha256(Path(file_path).read_bytes()).hexdigest()
    last = ctx.finished[-1] if ctx.finished else {}
    return {"model": spec, "model_meta": ctx.model_meta, "task": ctx.recipe.task, "image_size": ctx.recipe.image_size,
            "recipe": ctx.recipe.to_dict(), "metrics": last.get("metrics", {}),
            "eval_batch_size": ctx.recipe.train.eval_batch_size}


def export(model: nn.Module, config: ExportConfig, ctx: RunContext) -> nn.Module:
    from compress.evaluate import storage_bytes

    path = ctx.run_dir / config.path
    if ctx.is_main:
        size = write_artifact(path, model, artifact_manifest(ctx))
        ctx.log(f"export: wrote {path} ({size:,} bytes)")
    ctx.accelerator.wait_for_everyone()
    # the stage's size is the file: tensors (as measured) plus the header with its manifest
    ctx.file_overhead_bytes = max(0, path.stat().st_size - storage_bytes(model))
    return model


STAGE = StageSpec("export", ExportConfig, export)
