"""The `prune` stage and the checkpoint restorer that replays its shape manifest."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from compress.checkpoint import RESTORE_SHAPES, register_restorer
from compress.prune.config import PruneConfig
from compress.prune.core import prune_model
from compress.prune.manifest import apply_manifest, merge_manifests
from compress.prune.trace import example_batch
from compress.stages import register_stage

if TYPE_CHECKING:
    from compress.pipeline import RunContext


@register_stage("prune", PruneConfig)
def prune(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    """Group channel pruning; the manifest goes to `ctx.model_meta["prune"]` (merged with earlier prunes)."""
    example = example_batch(model, ctx.recipe.image_size)
    if config.method == "uniform":
        from compress.prune.baselines import uniform_magnitude_prune

        result = uniform_magnitude_prune(model, example, config.target, scope=config, log=ctx.log)
    else:
        result = prune_model(model, config, example, log=ctx.log)
    ctx.model_meta["prune"] = merge_manifests(ctx.model_meta.get("prune"), result.manifest)
    ctx.stage_metrics.update({"params_ratio": result.figures["params_ratio"],
                              "macs_ratio": result.figures["macs_ratio"]})
    return result.model


@register_restorer("prune", priority=RESTORE_SHAPES)
def _restore(model: nn.Module, manifest: Any) -> nn.Module:
    return apply_manifest(model, manifest)
