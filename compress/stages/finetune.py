"""The `finetune` and `evaluate` stages."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch.nn as nn
from pydantic import Field

from compress.config import Config
from compress.stages.spec import StageSpec
from compress.train import TrainConfig, fit

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class FinetuneConfig(TrainConfig):
    """Plain training on the task loss (from scratch when the recipe gives no checkpoint)."""


class EvaluateConfig(Config):
    split: Literal["train", "val", "calib"] = Field("val", description="which data of the recipe to evaluate on")


def finetune(model: nn.Module, config: FinetuneConfig, ctx: RunContext) -> nn.Module:
    return fit(model, ctx, config)


def evaluate(model: nn.Module, config: EvaluateConfig, ctx: RunContext) -> nn.Module:
    """Records the metrics on the chosen split (val is always measured by the runner)."""
    if config.split != "val":
        ctx.stage_metrics.update({f"{config.split}_{k}": v for k, v in ctx.evaluate(model, config.split).items()})
    return model


FINETUNE = StageSpec("finetune", FinetuneConfig, finetune, trains=True)
EVALUATE = StageSpec("evaluate", EvaluateConfig, evaluate)
