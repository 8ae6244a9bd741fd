"""One accelerate-based training loop; stages add loss terms and gradient hooks instead of copying it.

Runs unchanged on one CPU process, on `torchrun --nproc_per_node N` (gloo, `Accelerator(cpu=True)`) and
on GPUs. Gradient hooks run after `accelerator.backward`, i.e. on gradients already all-reduced by DDP,
so anything they add is applied once per step and identically on every replica.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress.config import Config

if TYPE_CHECKING:
    from compress.pipeline import RunContext


class TrainConfig(Config):
    """Fields every training stage shares."""

    epochs: int = Field(10, ge=0)
    lr: float = Field(2e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0, description="not applied to norm scales and biases")
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int | None = Field(None, gt=0, description="per process; default: the recipe's train.batch_size")
    grad_clip: float | None = Field(10.0, gt=0)
    eval_every: int = Field(0, ge=0, description="evaluate on val every N epochs (0: only at the end of the stage)")


class TrainHook:
    """Extension points of `fit`; subclass and override what you need."""

    def on_train_start(self, model: nn.Module, total_steps: int) -> None: ...

    def extra_loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Named loss terms added to the task loss (computed after the task's forward)."""
        return {}

    def after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Runs on synchronised gradients, before clipping and the optimiser step."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Extra figures to log for the epoch."""
        return {}

    def on_train_end(self, model: nn.Module) -> None: ...


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, none on norm scales and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up then cosine (to 1 % of the peak) or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit(model: nn.Module, ctx: RunContext, cfg: TrainConfig, hooks: Sequence[TrainHook] = ()) -> nn.Module:
    """Train `model` on the recipe's train split with the task loss plus the hooks' terms; returns it unwrapped."""
    accelerator = ctx.accelerator
    batch_size = cfg.batch_size or ctx.recipe.train.batch_size
    if cfg.epochs == 0:
        return model
    loader = ctx.task.loader(ctx.dataset("train"), batch_size, shuffle=True, seed=ctx.stage_seed,
                             num_workers=ctx.recipe.train.num_workers)
    params = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, max(warmup, 1), cfg.schedule))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for hook in hooks:
        hook.on_train_start(model, total_steps)

    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        sums: dict[str, float] = {}
        count = 0
        with ctx.progress(f"{ctx.stage_name} epoch {epoch + 1}/{cfg.epochs}", total=len(loader)) as advance:
            for batch in loader:
                loss, parts = ctx.task.loss(model, batch)
                for hook in hooks:
                    for name, term in hook.extra_loss(model, batch).items():
                        loss = loss + term
                        parts[name] = term.item()
                parts["loss"] = loss.item()
                if not math.isfinite(parts["loss"]):
                    raise FloatingPointError(f"{ctx.stage_name}: loss is {parts['loss']} at epoch {epoch + 1}, step {step}")
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                for hook in hooks:
                    hook.after_backward(model, step, epoch)
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                count += 1
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + value
                advance(loss=parts["loss"])
        figures = {name: value / max(count, 1) for name, value in sums.items()}
        figures["lr"] = scheduler.get_last_lr()[0]
        for hook in hooks:
            figures.update(hook.on_epoch_end(model, epoch))
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            figures.update(ctx.evaluate(accelerator.unwrap_model(model)))
        ctx.log(f"{ctx.stage_name} epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={_fmt(v)}" for k, v in figures.items()))
    for hook in hooks:
        hook.on_train_end(model)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        broadcast_buffers(model)
        check_replicas_in_sync(model, ctx)
    return model


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every replica process 0's buffers (BN statistics drift apart: each sees its own last batch)."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def check_replicas_in_sync(model: nn.Module, ctx: RunContext) -> None:
    """Compare a per-tensor fingerprint of every process's weights; replicas that drifted are a bug."""
    fingerprint = torch.stack([t.double().sum() + t.double().abs().sum() for t in model.state_dict().values()
                               if t.is_floating_point()]).to(ctx.device)
    gathered = ctx.accelerator.gather(fingerprint[None]).view(ctx.accelerator.num_processes, -1)
    drift = (gathered - gathered[0]).abs().max().item()
    if drift > 1e-6 * max(1.0, gathered.abs().max().item()):
        raise RuntimeError(f"{ctx.stage_name}: model replicas differ across processes (max drift {drift:.3g})")
    ctx.log(f"{ctx.stage_name}: {ctx.accelerator.num_processes} replicas in sync (max fingerprint drift {drift:.3g})")


def _fmt(value: float) -> str:
    return f"{value:.4g}"
