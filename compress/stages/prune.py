"""The `prune` stage: group channel pruning (or the uniform baseline); its manifest goes to the model meta."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
from torch.utils.data import Subset

from compress.prune.config import PruneConfig
from compress.format.prune_manifest import merge_manifests
from compress.format.restorers import PRUNE_META_KEY
from compress.models.protocol import example_batch
from compress.stages.spec import StageSpec

if TYPE_CHECKING:
    from compress.pipeline import RunContext


def prune(model: nn.Module, config: PruneConfig, ctx: RunContext) -> nn.Module:
    """Group channel pruning; the manifest goes to `ctx.model_meta["prune"]` (merged with earlier prunes)."""
    # imported here: torch-pruning (with timm and torchvision) takes seconds, which a recipe check or --help need not wait
    from compress.prune.baselines import uniform_magnitude_prune
    from compress.prune.core import prune_model

    example = example_batch(model, ctx.recipe.image_size)
    if config.method == "uniform":
        result = uniform_magnitude_prune(model, example, config.target, scope=config, log=ctx.log)
    else:
        batches = None
        if config.importance == "data":
            data = ctx.dataset("calib")
            loader = ctx.task.loader(Subset(data, range(min(config.importance_samples, len(data)))), 16,
                                     shuffle=False)
            batches = [ctx.task.inputs(batch) for batch in loader]
        result = prune_model(model, config, example, log=ctx.log, batches=batches)
    ctx.model_meta[PRUNE_META_KEY] = merge_manifests(ctx.model_meta.get(PRUNE_META_KEY), result.manifest)
    ctx.stage_metrics.update({"params_ratio": result.figures["params_ratio"],
                              "macs_ratio": result.figures["macs_ratio"]})
    return result.model


STAGE = StageSpec("prune", PruneConfig, prune)
