"""The `distill` stage: task loss + per-group weighted attention-transfer loss (+ optional output KD)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from compress.distill.attention import attention_loss
from compress.distill.hooks import FeatureRecorder
from compress.distill.layers import DistillLayer, auto_layers
from compress.errors import UserError
from compress.recipe import Config
from compress.stages import register_stage
from compress.tasks.base import unwrap
from compress.train import TrainConfig, TrainHook, fit

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class AttentionConfig(Config):
    p: float = Field(2.0, gt=0, description="attention = mean over channels of |A|^p")
    weights: dict[Literal["backbone", "neck", "coarsest"], float] = Field(
        default_factory=lambda: {"backbone": 1e6, "neck": 1e4, "coarsest": 1e3},
        description="loss weight per layer role (defaults after the authors' code)")
    layers: list[str] | Literal["auto"] = Field("auto", description="module names, or the last block of each scale")


class OutputKDConfig(Config):
    weight: float = Field(0.0, ge=0, description="0 turns output distillation off")
    temperature: float = Field(3.0, gt=0, description="classification KL temperature")


class DistillConfig(TrainConfig):
    teacher: str = Field("before-prune", description="'before-prune' (from the run dir) or a stage checkpoint path")
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    output_kd: OutputKDConfig = Field(default_factory=OutputKDConfig)


def output_kd_loss(student: Any, teacher: Any, task: str, temperature: float) -> torch.Tensor:
    """Classification: KL at a temperature (x T^2). Tensor-protocol detectors: box L2 + class BCE to teacher probabilities."""
    if task == "classification":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    loss = student[0].new_zeros(())
    for s, te in zip(student, teacher):
        loss = loss + F.mse_loss(s[:, :4], te[:, :4]) + F.binary_cross_entropy_with_logits(s[:, 4:], te[:, 4:].sigmoid())
    return loss


class AttentionDistillHook(TrainHook):
    """Adds sum_l beta(l) * mean((Q_T - Q_S)^2) (and output KD) to the task loss of each step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[DistillLayer], config: DistillConfig,
                 ctx: RunContext) -> None:
        self.teacher, self.layers, self.config, self.ctx = teacher, layers, config, ctx
        names = [layer.name for layer in layers]
        self.student_features = FeatureRecorder(student, names)
        self.teacher_features = FeatureRecorder(teacher, names)
        self.student_output: list[Any] = []
        self._output_hook = student.register_forward_hook(lambda _m, _i, out: self.student_output.__setitem__(slice(None), [out]))
        self._warned: set[str] = set()

    def extra_loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(self.ctx.task.inputs(batch))
        total = None
        for layer in self.layers:
            s, t = self.student_features.features[layer.name], self.teacher_features.features[layer.name]
            if s.shape[-2:] != t.shape[-2:] and layer.name not in self._warned:
                self._warned.add(layer.name)
                self.ctx.log(f"distill: {layer.name} student map {tuple(s.shape[-2:])} resized to the teacher's {tuple(t.shape[-2:])}")
            term = self.config.attention.weights[layer.role] * attention_loss(s, t, self.config.attention.p)
            total = term if total is None else total + term
        terms = {"attention": total} if total is not None else {}
        if self.config.output_kd.weight > 0:
            kd = output_kd_loss(self.student_output[0], teacher_out, self.ctx.task.name, self.config.output_kd.temperature)
            terms["output_kd"] = self.config.output_kd.weight * kd
        return terms

    def remove(self) -> None:
        self.student_features.remove()
        self.teacher_features.remove()
        self._output_hook.remove()


def load_teacher(spec: str, ctx: RunContext) -> nn.Module:
    """The frozen teacher: the model before the first prune stage of this run, or a stage checkpoint."""
    from compress.checkpoint import load_model

    if spec == "before-prune":
        names = [entry["name"] for entry in ctx.finished]
        if "prune" not in names or names.index("prune") == 0:
            raise UserError(f"stages.{ctx.stage_index}.distill.teacher: 'before-prune' needs a prune stage earlier "
                            "in the recipe (or give a checkpoint path)")
        path = ctx.run_dir / ctx.finished[names.index("prune") - 1]["checkpoint"]
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"stages.{ctx.stage_index}.distill.teacher: {path} not found")
    teacher, _ = load_model(path, allow_build=ctx.recipe.model.build)
    ctx.log(f"distill: teacher from {path}")
    teacher.eval().requires_grad_(False)
    return teacher.to(ctx.device)


@register_stage("distill", DistillConfig, trains=True)
def distill(model: nn.Module, config: DistillConfig, ctx: RunContext) -> nn.Module:
    teacher = load_teacher(config.teacher, ctx)
    example = ctx.example_input(model)
    if config.attention.layers == "auto":
        layers = auto_layers(unwrap(model), example)
    else:
        roles = {layer.name: layer for layer in auto_layers(unwrap(model), example, min_stride=1)}
        layers = [roles.get(name, DistillLayer(name, 0, "neck")) for name in config.attention.layers]
    ctx.log("distill: attention at " + ", ".join(f"{l.name} (s{l.stride}, {l.role})" for l in layers))
    hook = AttentionDistillHook(model, teacher, layers, config, ctx)
    try:
        return fit(model, ctx, config, hooks=[hook])
    finally:
        hook.remove()
