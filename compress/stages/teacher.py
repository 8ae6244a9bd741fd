"""The teacher of the distill and recover stages: the model before pruning, in memory or from the run dir."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from compress.errors import UserError
from compress.format.checkpoint import load_model

if TYPE_CHECKING:
    from compress.pipeline import RunContext


def load_teacher(spec: str, ctx: RunContext) -> nn.Module:
    """The frozen teacher: `ctx.teacher` when the runner holds the unpruned model in memory (compress shrink), else
    for 'before-prune' the checkpoint before the first prune stage of this run, else the stage checkpoint `spec`."""
    if spec == "before-prune" and ctx.teacher is not None:
        return ctx.teacher.eval().requires_grad_(False).to(ctx.device)
    if spec == "before-prune":
        names = [entry["name"] for entry in ctx.finished]
        if "prune" not in names or names.index("prune") == 0:
            raise UserError(f"stages.{ctx.stage_index}.{ctx.stage_name}.teacher: 'before-prune' needs a prune stage "
                            "earlier in the recipe (or give a checkpoint path)")
        path = ctx.run_dir / ctx.finished[names.index("prune") - 1]["checkpoint"]
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"stages.{ctx.stage_index}.{ctx.stage_name}.teacher: {path} not found")
    teacher, _ = load_model(path, allow_build=ctx.recipe.model.build)
    ctx.log(f"{ctx.stage_name}: teacher from {path}")
    teacher.eval().requires_grad_(False)
    return teacher.to(ctx.device)
