"""Fold the constant that a removed channel still emits into the layers that read it.

A channel whose BN scale is (near) zero outputs `bn(x) = beta` everywhere, so after the activation and
any element-wise ops it reaches the next layers as a constant `a_c` (e.g. `act(beta)`). Removing it
would drop `sum_k W[:, c, k] * a_c` from each consumer; we add that to the consumer's bias instead (or
subtract it from the running mean of the BN right after a bias-free conv, or give the conv a bias).

The constants are *measured*, not derived: on a copy of the model whose removed channels have gamma = 0,
one forward pass records each consumer's input at those channels. A channel counts as constant when its
standard deviation over batch and positions is below 1e-5 x (1 + |mean|); others (magnitude-pruned
channels, channels mixed with non-removed ones, e.g. by squeeze-excitation gates) are not folded.
Exact for 1x1 convs and linear layers; at the borders of a zero-padded k x k conv the fold adds taps the
padding would have zeroed (the interior is exact).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from torch_pruning.ops import OPTYPE

from compress.prune.graph import Analysis, Member, Unit, own_forward
from compress.models.protocol import eval_raw_forward_batches
from compress.prune.moments import ChannelMoments


def _removed_locals(keep: np.ndarray, member: Member) -> np.ndarray:
    """Local indices of `member` whose unit element is removed: int64 [r]."""
    return np.unique(member.local[~keep[member.root]])


def zero_gammas(model: nn.Module, units: Sequence[Unit], keeps: Sequence[np.ndarray]) -> None:
    """Set gamma = 0 on the removed channels of every BN carrier (what removal is meant to approximate)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for unit, keep in zip(units, keeps):
            for c in unit.carriers:
                if c.kind != "gamma":
                    continue
                bn = modules[c.name]
                for root, local in zip(c.roots, c.locals):
                    if not keep[root]:
                        bn.weight[torch.as_tensor(local, device=bn.weight.device)] = 0.0


@torch.no_grad()
def fold_removed(analysis: Analysis, units: Sequence[Unit], keeps: Sequence[np.ndarray],
                 batches: Sequence[Any] | None = None) -> dict[str, int]:
    """Fold the constants of removed channels into their consumers (in place); returns counts.

    With `batches` (calibration images), every removed channel is replaced by its mean over them instead (the
    constant that least changes the consumer's output, whether or not the channel was constant)."""
    model = analysis.model
    consumers: dict[str, set[int]] = {}
    for unit, keep in zip(units, keeps):
        if unit.kind != "channels" or keep.all():
            continue
        for m in unit.members:
            if m.dim == "in":
                consumers.setdefault(m.module, set()).update(_removed_locals(keep, m).tolist())
    modules = dict(model.named_modules())
    consumers = {k: v for k, v in consumers.items()
                 if isinstance(modules.get(k), (nn.Conv2d, nn.Conv1d, nn.Linear)) and not own_forward(modules[k]) and v}
    if not consumers:
        return {"folded": 0, "not_constant": 0}
    probe = copy.deepcopy(model) if batches is None else model
    if batches is None:
        zero_gammas(probe, units, keeps)
    probe_modules = dict(probe.named_modules())
    device = next(model.parameters()).device
    indices = {name: torch.as_tensor(sorted(channels), device=device) for name, channels in consumers.items()}
    stats = {name: ChannelMoments() for name in consumers}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
            stats[name].add(inputs[0].index_select(axis, indices[name]), axis)
        return hook

    eval_raw_forward_batches(probe, {probe_modules[name]: hook_for(name) for name in consumers},
                             batches if batches is not None else [analysis.example])
    del probe
    folded = skipped = 0
    for name, channels in consumers.items():
        if not stats[name].n:
            continue
        mean, std = stats[name].mean(), stats[name].var().sqrt()
        constant = std <= 1e-5 * (1 + mean.abs()) if batches is None else torch.ones_like(std, dtype=torch.bool)
        idx = sorted(channels)
        use = [(c, float(mean[i])) for i, c in enumerate(idx) if constant[i]]
        skipped += len(idx) - len(use)
        if use:
            _fold_into(analysis, name, modules[name], use)
            folded += len(use)
    return {"folded": folded, "not_constant": skipped}


def _fold_into(analysis: Analysis, name: str, layer: nn.Module, channels: list[tuple[int, float]]) -> None:
    """Add sum_k W[:, c, k] * value for each (input channel c, value) to the layer's output."""
    weight = layer.weight.detach()
    delta = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if isinstance(layer, nn.Linear):
        for c, value in channels:
            delta += weight[:, c].double() * value
    else:
        if getattr(layer, "transposed", False):
            return
        per_in = layer.in_channels // layer.groups
        per_out = layer.out_channels // layer.groups
        taps = weight.double().flatten(2).sum(2)  # [out, in/groups]
        for c, value in channels:
            g = c // per_in
            rows = slice(g * per_out, (g + 1) * per_out)
            delta[rows] += taps[rows, c % per_in] * value
    delta = delta.to(weight.dtype)
    if layer.bias is not None:
        layer.bias.data += delta
        return
    bn = _bn_after(analysis, layer)
    if bn is not None and bn.running_mean is not None:
        bn.running_mean -= delta
        return
    layer.bias = nn.Parameter(delta)


def _bn_after(analysis: Analysis, layer: nn.Module) -> nn.Module | None:
    """The BatchNorm that is the only reader of `layer`'s output, if any."""
    node = analysis.graph.module2node.get(layer)
    if node is None or len(set(node.outputs)) != 1:
        return None
    after = node.outputs[0]
    return after.module if after.type == OPTYPE.BN else None
