"""Calibration views pushed toward the model's own BatchNorm statistics.

A few photos calibrate a model trained on millions: their feature statistics are the photos', not the training
set's, and every fit learned on them follows the photos. The running means and variances of a network's
BatchNorm layers are the training data's feature statistics, stored in the checkpoint. Starting from each real
calibration batch, a copy is optimised so that the batch mean and standard deviation of every BatchNorm's input
match its running statistics (the loss of ZeroQ, Cai et al. 2020, which starts from noise; here, as in Genie,
Jeon et al. 2023, from real data, a few steps away). The copies are added to the calibration batches: more
views of the same photos, closer to what the model was trained on (docs/BENCHMARKS.md, session 19).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compress.quant.sites import no_fastpath

__all__ = ["batchnorm_layers", "batchnorm_statistics_loss", "bn_statistic_views", "viewable_batches"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that hold running statistics (what the views are matched to)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


def viewable_batches(model: nn.Module, batches: list[Any]) -> list[int]:
    """Indices of the batches a view is made from: one floating tensor of more than one input each, for a model
    with BatchNorm statistics (none otherwise)."""
    if not batchnorm_layers(model):
        return []
    return [i for i, b in enumerate(batches) if torch.is_tensor(b) and b.is_floating_point() and b.shape[0] > 1]


def batchnorm_statistics_loss(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Mean squared gap between the per-channel mean and std of a BatchNorm's input batch x [N, C, ...] and
    the layer's running mean and std."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.float().mean(dim=dims)
    std = x.float().var(dim=dims, unbiased=False).clamp_min(1e-8).sqrt()
    return ((mean - bn.running_mean.float()).pow(2).mean()
            + (std - bn.running_var.float().clamp_min(1e-8).sqrt()).pow(2).mean())


def bn_statistic_views(model: nn.Module, batches: list[Any], steps: int, lr: float = 0.05,
                       advance: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """One view per batch of `viewable_batches`: a copy moved by `steps` Adam steps (learning rate `lr` times the
    batch's std) toward the BatchNorm statistics of `model` (in eval mode; its parameters, buffers, mode and
    requires_grad flags are left as they were). A batch whose forward reaches no BatchNorm, or whose statistics do
    not depend on the input, gives no view. advance(batch index) is called after each viewable batch."""
    chosen = viewable_batches(model, batches) if steps > 0 else []
    if not chosen:
        return []
    terms: list[torch.Tensor] = []
    hooks = [bn.register_forward_hook(lambda m, inputs, _out: terms.append(batchnorm_statistics_loss(inputs[0], m)))
             for bn in batchnorm_layers(model)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    views = []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad(), no_fastpath():
            for index in chosen:
                batch = batches[index]
                x = batch.detach().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr * float(batch.float().std().clamp_min(1e-8)))
                for _ in range(steps):
                    terms.clear()
                    model(x)
                    if not terms:
                        break
                    loss = torch.stack(terms).sum()
                    if not loss.requires_grad:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                else:
                    views.append(x.detach())
                if advance is not None:
                    advance(index)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return views
