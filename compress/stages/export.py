"""The `export` stage: writes the run's model as one artifact, DIR/model.safetensors by default."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from pydantic import Field

from compress.format.artifact import write_artifact
from compress.format.restorers import QUANT_META_KEY, artifact_plan
from compress.config import Config
from compress.stages.spec import StageSpec

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class ExportConfig(Config):
    path: str = Field("model.safetensors", description="artifact path, relative to the run directory")
    fold_bn: bool = Field(True, description="fold BatchNorms into the convs before them for inference (exact for "
                                            "float convs, and for quantized convs whose BN the quantize stage "
                                            "already folded); the artifact reloads as the folded model")
    float16: bool = Field(True, description="round the float32 tensors left (biases, norms, layers kept in float) "
                                            "to float16 values, which the artifact stores in half the bytes; the "
                                            "model stays float32 and the stage's metrics measure the rounding")


@torch.no_grad()
def round_to_float16(model: nn.Module) -> int:
    """Round every float32 parameter and buffer to the nearest float16 value, in place (a tensor with a value
    outside float16's range is left alone); returns how many tensors were rounded."""
    rounded = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype != torch.float32 or not tensor.numel():
            continue
        half = tensor.half()
        if bool(half.isfinite().all()) and bool(tensor.isfinite().all()):
            tensor.copy_(half.float())
            rounded += 1
    return rounded


def prepare_for_export(model: nn.Module, config: ExportConfig, ctx: RunContext) -> nn.Module:
    """The inference form the artifact stores: BNs folded (`fold_bn`), float tensors at float16 values (`float16`)."""
    if config.fold_bn:
        model = fold_for_inference(model, ctx)
    if config.float16:
        ctx.log(f"export: {round_to_float16(model)} float tensors rounded to float16 values")
    return model


def fold_for_inference(model: nn.Module, ctx: RunContext) -> nn.Module:
    """Remove the BatchNorms that fold exactly into their convs (compress.quant.fold.remove_batchnorms) and record
    them in `ctx.model_meta["bn_fold"]`, so the artifact rebuilds the folded model."""
    from compress.format.restorers import BN_FOLD_META_KEY
    from compress.quant.sites import no_fastpath
    from compress.quant.fold import remove_batchnorms

    with no_fastpath():
        pairs = remove_batchnorms(model, ctx.example_input(model))
    if pairs:
        done = ctx.model_meta.get(BN_FOLD_META_KEY, {"pairs": []})["pairs"]
        ctx.model_meta[BN_FOLD_META_KEY] = {"pairs": done + pairs}
        ctx.log(f"export: {len(pairs)} BatchNorms folded into their convs")
    return model


def artifact_manifest(ctx: RunContext) -> dict[str, Any]:
    """What a reader needs besides the tensors: builder, architecture changes, recipe, metrics."""
    spec = ctx.model_spec()
    if spec["build"].startswith("file:"):
        file_path = spec["build"][len("file:"):].rsplit(":", 1)[0]
        spec["file_sha256"] = hashlib.sha256(Path(file_path).read_bytes()).hexdigest()
    last = ctx.finished[-1] if ctx.finished else {}
    meta = dict(ctx.model_meta)
    if QUANT_META_KEY in meta:
        meta[QUANT_META_KEY] = artifact_plan(meta[QUANT_META_KEY])
    return {"model": spec, "model_meta": meta, "task": ctx.recipe.task, "image_size": ctx.recipe.image_size,
            "recipe": ctx.recipe.to_dict(), "metrics": last.get("metrics", {}),
            "eval_batch_size": ctx.recipe.train.eval_batch_size}


def export(model: nn.Module, config: ExportConfig, ctx: RunContext) -> nn.Module:
    model = prepare_for_export(model, config, ctx)
    path = ctx.run_dir / config.path
    if ctx.is_main:
        size = write_artifact(path, model, artifact_manifest(ctx))
        ctx.log(f"export: wrote {path} ({size:,} bytes)")
    ctx.accelerator.wait_for_everyone()
    ctx.file_bytes = path.stat().st_size  # the stage's size is the file's: header, manifest and tensors
    return model


STAGE = StageSpec("export", ExportConfig, export)
