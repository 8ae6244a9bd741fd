"""The `recover` stage: a short, label-free repair of a pruned model on calibration images.

1. BatchNorm re-estimation: pruning changes what reaches every later layer, so the running mean/var of
   the BatchNorm layers no longer match; they are recomputed (a plain average over the calibration
   batches, weights untouched).
2. Optionally (`steps > 0`) output distillation: the pruned model is trained for a few steps to match the
   unpruned model's outputs on the same images (classification: KL at a temperature; detectors: relative
   squared error of the raw head outputs), BatchNorm frozen, then the statistics are re-estimated once more.
No labels are read. The teacher is the model before pruning (`compress.stages.teacher`): `ctx.teacher` when
the runner keeps it in memory (compress shrink), else the checkpoint before the first prune stage of the run dir.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from pydantic import Field

from compress.config import Config
from compress.distill.losses import output_distillation_loss
from compress.models.memory_format import channels_last_on_cpu
from compress.models.protocol import eval_forward_with_hooks, raw_outputs
from compress.stages.spec import StageSpec
from compress.stages.teacher import load_teacher

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class RecoverConfig(Config):
    """`- recover: {bn: true, steps: 0}`: BN re-estimation and optional output distillation, no labels."""

    bn: bool = Field(True, description="re-estimate BatchNorm running statistics on the calibration images")
    steps: int = Field(0, ge=0, description="output-distillation steps from the unpruned model (0: none)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the distillation steps")
    temperature: float = Field(2.0, gt=0, description="classification KL temperature")
    batch_size: int = Field(32, gt=0, description="calibration batch size")


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: list[torch.Tensor], advance: Any = None) -> int:
    """Recompute every BatchNorm's running mean/var as the average over `batches` (other layers in eval
    mode, weights untouched); returns how many BatchNorm layers there were."""
    norms = batchnorms(model)
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        with raw_outputs(model):
            for x in batches:
                model(x)
                if advance:
                    advance()
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        model.train(was_training)
    return len(norms)


def drop_graph_caches(model: nn.Module) -> int:
    """Forget tensors that a module cached from a forward pass with their autograd graph (returns how many).

    Some models cache a tensor computed from their parameters in eval mode (timm's LeViT, EfficientFormer,
    TinyViT: `attention_bias_cache`, the gathered attention biases). Trained in eval mode, the first step caches
    it with its graph; the next step reuses the freed graph ("Trying to backward through the graph a second
    time") and, after the optimizer step, a stale value. Cached entries in dicts / lists are removed (the module
    recomputes them), a bare tensor attribute is detached. Parameters, buffers and submodules are not touched."""
    dropped = 0
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if name in ("_parameters", "_buffers", "_modules") or name.endswith("hooks"):
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                setattr(module, name, value.detach())
                dropped += 1
            elif isinstance(value, dict):
                stale = [k for k, v in value.items() if isinstance(v, torch.Tensor) and v.grad_fn is not None]
                for key in stale:
                    del value[key]
                dropped += len(stale)
            elif isinstance(value, list):
                kept = [v for v in value if not (isinstance(v, torch.Tensor) and v.grad_fn is not None)]
                dropped += len(value) - len(kept)
                value[:] = kept
    return dropped


def distill_steps(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], config: RecoverConfig,
                  task: str, advance: Any = None) -> list[float]:
    """`config.steps` Adam steps matching the teacher's outputs (BatchNorm and dropout in eval mode). Tensors a
    module caches in eval mode are dropped before every step (`drop_graph_caches`), so no step reuses the graph
    or the pre-step value of another. The batches are cycled unchanged and the teacher is frozen, so its output
    for each batch is computed once and reused (a quarter of a step's work saved once the batches repeat)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    was_training = student.training
    student.eval()
    teacher.eval()
    losses = []
    try:
        with raw_outputs(student), raw_outputs(teacher):
            targets: dict[int, Any] = {}
            for i in itertools.islice(itertools.cycle(range(len(batches))), config.steps):
                x = batches[i]
                drop_graph_caches(student)
                if i not in targets:
                    with torch.no_grad():
                        targets[i] = teacher(x)
                target = targets[i]
                loss = output_distillation_loss(student(x), target, task, config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if advance:
                    advance(loss=losses[-1])
    finally:
        drop_graph_caches(student)
        student.train(was_training)
        student.zero_grad(set_to_none=True)
    return losses


def recover(model: nn.Module, config: RecoverConfig, ctx: RunContext) -> nn.Module:
    loader = ctx.task.loader(ctx.dataset("calib"), config.batch_size, shuffle=False)
    batches = [ctx.task.inputs(batch).to(ctx.device) for batch in loader]
    with channels_last_on_cpu(model, scope="recovery", probe=lambda: _probe(model, batches)):
        _recover(model, config, ctx, batches)
    return model


def _probe(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """One forward of the first batch in eval mode, for `channels_last_on_cpu` to check the layout works."""
    if batches:
        with raw_outputs(model):
            eval_forward_with_hooks(model, batches[0], [])


def _recover(model: nn.Module, config: RecoverConfig, ctx: RunContext, batches: list[torch.Tensor]) -> None:
    if config.bn:
        with ctx.progress("recover: BatchNorm statistics", total=len(batches)) as advance:
            count = reestimate_bn(model, batches, lambda: advance())
        ctx.log(f"recover: re-estimated {count} BatchNorm layers on {sum(len(b) for b in batches)} calibration images"
                if count else "recover: no BatchNorm layer to re-estimate")
    if config.steps:
        teacher = load_teacher("before-prune", ctx).to(ctx.device)
        with ctx.progress("recover: distillation", total=config.steps) as advance, channels_last_on_cpu(teacher, scope="recovery", probe=lambda: _probe(teacher, batches)):
            losses = distill_steps(model, teacher, batches, config, ctx.task.name, advance)
        ctx.log(f"recover: {config.steps} output-distillation steps from the unpruned model, "
                f"loss {losses[0]:.4g} -> {sum(losses[-5:]) / len(losses[-5:]):.4g} (mean of the last 5)")
        if config.bn:
            reestimate_bn(model, batches)


STAGE = StageSpec("recover", RecoverConfig, recover, trains=True)
