"""Channel importance from data: how much of its readers' output a channel carries.

|gamma| says how large a channel is after its BatchNorm, not how much the next layers use it. On a model
trained without sparsity (a pretrained checkpoint) that is a weak guide. With a few calibration batches we
can measure what removing channel c does to each layer that reads it: the reader's output changes by
W[:, c] * (x_c - m_c) when the channel is replaced by its mean m_c, so the share of reader output o's
variance that channel c carries is, to first order (channels taken as uncorrelated),

    Var(x_c) * sum_k W[o, c, k]^2 / Var(y_o)

and the channel's score is that share averaged over the reader's outputs, summed over its readers. It is a
unitless share, comparable across layers and groups (the `Decider` pools these scores without rescaling).
Layers the channel only passes through (a depthwise conv of the same unit) are not readers: the
layer after them is.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.models.protocol import raw_forward
from compress.prune.graph import Analysis

DATA_KIND = "data"


class _Moments:
    """Per-channel running sums of x and x^2 over every position (channel axis 1, or the last for linear)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, t: torch.Tensor, channel_axis: int) -> None:
        t = t.detach().double().movedim(channel_axis, -1).reshape(-1, t.shape[channel_axis])
        s1, s2 = t.sum(0), (t * t).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += t.shape[0]

    def mean(self) -> torch.Tensor:
        return self.s1 / max(self.n, 1)

    def var(self) -> torch.Tensor:
        return (self.s2 / max(self.n, 1) - self.mean() ** 2).clamp_min(0)


def _readers(analysis: Analysis) -> dict[str, nn.Module]:
    """conv / linear modules that read some prunable unit (not just pass its channels through)."""
    modules = dict(analysis.model.named_modules())
    out: dict[str, nn.Module] = {}
    for unit in analysis.prunable_units():
        if unit.kind != "channels":
            continue
        producers = {m.module for m in unit.members if m.dim == "out"}
        for m in unit.members:
            layer = modules.get(m.module)
            if m.dim == "in" and m.module not in producers and isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                out[m.module] = layer
    return out


@torch.no_grad()
def forward_with_hooks(model: nn.Module, hooks: dict[nn.Module, Callable], batches: Iterable[Any]) -> None:
    """Run `batches` through `model` in eval mode with forward hooks {module: hook(module, inputs, output)}."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            raw_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def reader_moments(model: nn.Module, readers: dict[str, nn.Module], batches: Iterable[Any]
                   ) -> dict[str, tuple[_Moments, _Moments]]:
    """One pass over `batches`: the input and output moments of every reader."""
    moments = {name: (_Moments(), _Moments()) for name in readers}

    def hook_for(name: str, axis: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                moments[name][0].add(inputs[0], axis)
                moments[name][1].add(output, axis)
        return hook

    forward_with_hooks(model, {layer: hook_for(name, -1 if isinstance(layer, nn.Linear) else 1)
                               for name, layer in readers.items()}, batches)
    return moments


def _column_share(layer: nn.Module, out_var: torch.Tensor, in_var: torch.Tensor) -> torch.Tensor:
    """float64 [in]: per input channel, Var(x_c) * mean_o sum_k W[o, c, k]^2 / Var(y_o)."""
    w = layer.weight.detach().double()
    inv = 1.0 / out_var.clamp_min(1e-12 * float(out_var.max().clamp_min(1e-30)))
    if isinstance(layer, nn.Linear):
        col = (w * w * inv[:, None]).sum(0)
        return in_var * col / w.shape[0]
    if layer.transposed:  # [in, out / groups, k...]
        groups, per_out = layer.groups, w.shape[1]
        sq = (w * w).flatten(2).sum(2)  # [in, out / groups]
        per_in = w.shape[0] // groups
        group = torch.arange(w.shape[0]) // per_in
        idx = group[:, None] * per_out + torch.arange(per_out)[None, :]
        col = (sq * inv[idx]).sum(1)
        return in_var * col / (per_out * groups)
    groups, per_in = layer.groups, w.shape[1]
    sq = (w * w).flatten(2).sum(2)  # [out, in / groups]
    col = (sq * inv[:, None]).reshape(groups, -1, per_in).sum(1).reshape(-1)  # [in]
    return in_var * col / w.shape[0]


def score_from_data(analysis: Analysis, batches: Iterable[Any]) -> int:
    """Replace the carriers' scores of prunable channel units by the data score (kind `DATA_KIND`); units no
    reader measures keep their |gamma| / magnitude scores. Returns how many units were rescored."""
    readers = _readers(analysis)
    if not readers:
        return 0
    moments = reader_moments(analysis.model, readers, batches)
    shares = {}
    for name, (inp, out) in moments.items():
        if inp.n == 0 or out.n == 0:
            continue
        shares[name] = _column_share(readers[name], out.var(), inp.var()).cpu().numpy()
    rescored = 0
    for unit in analysis.prunable_units():
        if unit.kind != "channels" or not unit.carriers:
            continue
        producers = {m.module for m in unit.members if m.dim == "out"}
        score = np.zeros(unit.size)
        seen = False
        for m in unit.members:
            if m.dim != "in" or m.module in producers or m.module not in shares:
                continue
            share = shares[m.module]
            if len(m.local) and int(m.local.max()) < len(share):
                np.add.at(score, m.root, share[m.local])
                seen = True
        if not seen:
            continue
        for c in unit.carriers:
            c.score = score[c.roots]
            c.scored_by = DATA_KIND
        rescored += 1
    return rescored
