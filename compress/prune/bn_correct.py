"""Carry a pretrained model's BatchNorm statistics across pruning instead of re-estimating them.

Re-estimating BN statistics on a few calibration images replaces the population statistics a pretrained model
learned on its training set with those of a handful of photos; on ImageNet MobileNetV2 that alone dropped the
confident top-1 agreement from 0.92 to 0.68. Pruning only changes each BN's input by what the removed channels
carried, so we correct by that change, measured on the calibration images with the same model before and after:

    running_mean += mean_after - mean_before        running_var *= var_after / var_before
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from compress.models.protocol import eval_raw_forward_batches
from compress.prune.moments import ChannelMoments


def _norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None}


@torch.no_grad()
def bn_input_moments(model: nn.Module, batches: Iterable[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm (by name): the mean and variance of its input per channel over `batches` (eval mode)."""
    norms = _norms(model)
    moments = {name: ChannelMoments() for name in norms}
    eval_raw_forward_batches(model, {m: (lambda mod, inp, out, name=name: moments[name].add(inp[0], 1))
                               for name, m in norms.items()}, batches)
    return {name: (m.mean(), m.var()) for name, m in moments.items() if m.n}


@torch.no_grad()
def correct_bn(model: nn.Module, before: dict[str, tuple[torch.Tensor, torch.Tensor]],
               after: dict[str, tuple[torch.Tensor, torch.Tensor]], max_ratio: float = 100.0) -> int:
    """Shift each BN's running statistics by the change from `before` to `after` (same channels); returns how many
    BatchNorms changed. Channels whose variance before is ~0 keep their running variance."""
    changed = 0
    for name, bn in _norms(model).items():
        if name not in before or name not in after or before[name][0].shape != bn.running_mean.shape:
            continue
        (m0, v0), (m1, v1) = before[name], after[name]
        bn.running_mean += (m1 - m0).to(bn.running_mean)
        ratio = torch.where(v0 > 1e-12 * (1 + v0.max()), v1 / v0.clamp_min(1e-30), torch.ones_like(v0))
        bn.running_var *= ratio.clamp(1.0 / max_ratio, max_ratio).to(bn.running_var)
        changed += 1
    return changed
