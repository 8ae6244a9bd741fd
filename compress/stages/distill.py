"""The `distill` stage: task loss + per-group weighted attention-transfer loss (+ optional output KD)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from compress.distill.attention import attention_loss
from compress.distill.hooks import FeatureRecorder
from compress.distill.losses import output_distillation_loss
from compress.distill.layers import DistillLayer, auto_layers
from compress.config import Config
from compress.errors import UserError
from compress.stages.spec import StageSpec
from compress.stages.teacher import load_teacher
from compress.tasks.base import unwrap
from compress.train import TrainConfig, TrainHook, fit

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class AttentionConfig(Config):
    p: float = Field(2.0, gt=0, description="attention = mean over channels of |A|^p")
    weights: dict[Literal["backbone", "neck", "coarsest"], float] = Field(
        default_factory=lambda: {"backbone": 1e6, "neck": 1e4, "coarsest": 1e3},
        description="loss weight per layer role (defaults after the authors' code; a role left out gets 0)")
    layers: list[str] | Literal["auto"] = Field("auto", description="module names, or the last block of each scale")
    layer_weights: dict[str, float] = Field(default_factory=dict, description="beta per distilled layer (one per "
                                            "scale, i.e. per prune group's scale), by module name; overrides its role's")
    balance: float | None = Field(None, gt=0, description="instead of fixed betas: each layer's beta makes its term "
                                  "equal `balance` on the first train batches (teacher vs the pruned student)")
    balance_batches: int = Field(4, ge=1, le=1000, description="batches that measure the terms `balance` evens out")

    @field_validator("weights", "layer_weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for key, beta in value.items():
            if not beta >= 0:
                raise ValueError(f"{key}: a weight is >= 0 (got {beta})")
        return value


class OutputKDConfig(Config):
    weight: float = Field(0.0, ge=0, description="0 turns output distillation off")
    temperature: float = Field(3.0, gt=0, description="classification KL temperature")


class DistillConfig(TrainConfig):
    teacher: str = Field("before-prune", description="'before-prune' (from the run dir) or a stage checkpoint path")
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    output_kd: OutputKDConfig = Field(default_factory=OutputKDConfig)


class AttentionDistillHook(TrainHook):
    """Adds sum_l beta(l) * mean((Q_T - Q_S)^2) (and output KD) to the task loss of each step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[DistillLayer], config: DistillConfig,
                 ctx: RunContext, betas: dict[str, float] | None = None) -> None:
        self.teacher, self.layers, self.config, self.ctx = teacher, layers, config, ctx
        self.betas = betas or fixed_betas(layers, config.attention)
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
            term = self.betas[layer.name] * attention_loss(s, t, self.config.attention.p)
            total = term if total is None else total + term
        terms = {"attention": total} if total is not None else {}
        if self.config.output_kd.weight > 0:
            kd = output_distillation_loss(self.student_output[0], teacher_out, self.ctx.task.name,
                                          self.config.output_kd.temperature, dense="yolo")
            terms["output_kd"] = self.config.output_kd.weight * kd
        return terms

    def remove(self) -> None:
        self.student_features.remove()
        self.teacher_features.remove()
        self._output_hook.remove()


def fixed_betas(layers: list[DistillLayer], config: AttentionConfig) -> dict[str, float]:
    """beta per distilled layer: its own `layer_weights` entry, else its role's weight."""
    names = [layer.name for layer in layers]
    unknown = sorted(set(config.layer_weights) - set(names))
    if unknown:
        raise UserError(f"distill.attention.layer_weights: {unknown[0]!r} is not a distilled layer; these are "
                        f"{', '.join(names) or 'none'}")
    return {layer.name: config.layer_weights.get(layer.name, config.weights.get(layer.role, 0.0)) for layer in layers}


@torch.no_grad()
def initial_attention_losses(student: nn.Module, teacher: nn.Module, layers: list[DistillLayer], p: float,
                             batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean attention loss per layer over `batches`, as training will first see it: the student in train mode
    (its buffers, e.g. BN running statistics, restored after), the teacher in eval mode."""
    names = [layer.name for layer in layers]
    totals, count = dict.fromkeys(names, 0.0), 0
    modes, buffers = (student.training, teacher.training), [b.clone() for b in student.buffers()]
    student.train(), teacher.eval()
    try:
        with FeatureRecorder(student, names) as s_rec, FeatureRecorder(teacher, names) as t_rec:
            for inputs in batches:
                student(inputs), teacher(inputs)
                for name in names:
                    totals[name] += float(attention_loss(s_rec.features[name], t_rec.features[name], p))
                count += 1
    finally:
        student.train(modes[0]), teacher.train(modes[1])
        for buffer, saved in zip(student.buffers(), buffers):
            buffer.copy_(saved)
    return {name: total / max(count, 1) for name, total in totals.items()}


def balanced_betas(start: dict[str, float], balance: float) -> dict[str, float]:
    """beta = balance / starting loss per layer; a layer that starts (nearly) equal to the teacher, e.g. one that
    pruning left alone, is measured against 1/100 of the mean starting loss instead, not given a huge beta."""
    floor = max(0.01 * sum(start.values()) / max(len(start), 1), 1e-12)
    return {name: balance / max(loss, floor) for name, loss in start.items()}


def distill(model: nn.Module, config: DistillConfig, ctx: RunContext) -> nn.Module:
    teacher = load_teacher(config.teacher, ctx)
    example = ctx.example_input(model)
    if config.attention.layers == "auto":
        layers = auto_layers(unwrap(model), example)
    else:
        roles = {layer.name: layer for layer in auto_layers(unwrap(model), example, min_stride=1)}
        layers = [roles.get(name, DistillLayer(name, 0, "neck")) for name in config.attention.layers]
    betas = fixed_betas(layers, config.attention)
    if config.attention.balance is not None and layers:
        loader = ctx.task.loader(ctx.dataset("train"), ctx.recipe.train.batch_size, shuffle=False)
        batches = (ctx.task.inputs(b).to(ctx.device) for b, _ in zip(loader, range(config.attention.balance_batches)))
        start = initial_attention_losses(unwrap(model), teacher, layers, config.attention.p, batches)
        betas = balanced_betas(start, config.attention.balance)
    ctx.log("distill: attention at " + ", ".join(f"{l.name} (s{l.stride}, {l.role}, beta {betas[l.name]:.4g})"
                                                 for l in layers))
    hook = AttentionDistillHook(model, teacher, layers, config, ctx, betas)
    try:
        return fit(model, ctx, config, hooks=[hook])
    finally:
        hook.remove()


STAGE = StageSpec("distill", DistillConfig, distill, trains=True)
