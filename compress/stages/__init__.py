"""Stage registry: a stage is a frozen config class plus a function `(model, config, ctx) -> model`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.nn as nn

    from compress.pipeline import RunContext
    from compress.recipe import Config

StageFn = Callable[["nn.Module", Any, "RunContext"], "nn.Module"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[Config]
    fn: StageFn
    trains: bool  # whether the stage changes weights by training (it then seeds and logs epochs)


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, config_cls: type[Config], trains: bool = False) -> Callable[[StageFn], StageFn]:
    """Register `fn` as the stage `name` of recipes; a duplicate name raises."""

    def wrap(fn: StageFn) -> StageFn:
        if name in STAGES:
            raise ValueError(f"stage '{name}' is already registered by {STAGES[name].fn.__module__}")
        STAGES[name] = StageSpec(name, config_cls, fn, trains)
        return fn

    return wrap


from compress.stages import basic  # noqa: E402,F401  (registers finetune and evaluate)
from compress.distill import stage as _distill  # noqa: E402,F401
from compress.artifact import stage as _export  # noqa: E402,F401
from compress import prune as _prune, sparse as _sparse  # noqa: E402,F401
from compress.quant import stage as _quantize  # noqa: E402,F401
from compress.stages import recover as _recover  # noqa: E402,F401  (the label-free recovery stage of shrink)
