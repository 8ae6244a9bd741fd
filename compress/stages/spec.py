"""What a stage is: a frozen config class plus a function `(model, config, ctx) -> model`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import RecipeError
from compress.registry import Registry

if TYPE_CHECKING:
    import torch.nn as nn

    from compress.config import Config
    from compress.pipeline import RunContext

StageFn = Callable[["nn.Module", Any, "RunContext"], "nn.Module"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[Config]
    fn: StageFn
    trains: bool = False  # whether the stage changes weights by training (it then seeds and logs epochs)


STAGES: Registry[StageSpec] = Registry("stage", error=RecipeError)


def register_stage(name: str, config_cls: type[Config], trains: bool = False) -> Callable[[StageFn], StageFn]:
    """Register a user's stage `fn` as the stage `name` of recipes; a duplicate name raises."""
    return STAGES.register(name, lambda fn: StageSpec(name, config_cls, fn, trains))
