"""The `sparse` stage: training with the dynamic L1 sparsity term on prunable BN scales."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch.nn as nn
from pydantic import Field

from compress.prune.config import ScopeConfig
from compress.models.protocol import example_batch
from compress.sparse.hook import SparseHook
from compress.stages.spec import StageSpec
from compress.train import TrainConfig, fit

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class SparseConfig(TrainConfig, ScopeConfig):
    """Task loss + L1 sub-gradient on the BN scales the prune stage may remove (use the same scope fields
    -- groups, family_depth, ignore, protect_outputs -- as the prune stage that follows)."""

    sparsity: Literal["dynamic", "constant"] = Field(
        "dynamic", description="L1 rate schedule: dynamic (protect the largest |gamma| after switch_at) or constant")
    sparsity_rate: float = Field(1e-3, gt=0, description="s: the L1 rate on BN scales (the authors' YOLOv4 runs used 1e-4)")
    switch_at: float = Field(0.4, ge=0, le=1, description="share of training steps after which the dynamic schedule protects")
    protected_share: float = Field(0.35, ge=0, lt=1, description="share of channels (largest |gamma|, ranked over all prunable BNs) protected")
    protected_factor: float = Field(0.01, ge=0, le=1, description="protected channels get sparsity_rate x this")


def sparse(model: nn.Module, config: SparseConfig, ctx: RunContext) -> nn.Module:
    from compress.prune.core import analyze_scope  # torch-pruning: imported when a stage runs (see stages/prune.py)

    probe = copy.deepcopy(model)  # the analysis traces and sets eval mode; keep the trained model untouched
    analysis = analyze_scope(probe, example_batch(probe, ctx.recipe.image_size), config)
    channels = analysis.gamma_channels()
    groups = {c.name: c.group for u in analysis.prunable_units() for c in u.carriers if c.kind == "gamma"}
    del probe, analysis
    count = sum(int(m.sum()) for m in channels.values())
    ctx.log(f"sparse: L1 ({config.sparsity}, s={config.sparsity_rate:g}) on {count} channels of "
            f"{len(channels)} BatchNorm layers in {len(set(groups.values()))} groups")
    if not channels:
        ctx.log("sparse: the model has no prunable BatchNorm; training on the task loss only")
    hook = SparseHook(channels, groups, config.sparsity, config.sparsity_rate, config.switch_at,
                      config.protected_share, config.protected_factor)
    model = fit(model, ctx, config, [hook])
    ctx.stage_metrics.update({"small_gamma": hook.on_epoch_end(model, -1)["small_gamma"]} if channels else {})
    return model


STAGE = StageSpec("sparse", SparseConfig, sparse, trains=True)
