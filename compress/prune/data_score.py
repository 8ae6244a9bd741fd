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

from compress.models.protocol import eval_raw_forward_batches
from compress.prune.graph import Analysis
from compress.prune.moments import ChannelMoments

DATA_KIND = "data"


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


def reader_moments(model: nn.Module, readers: dict[str, nn.Module], batches: Iterable[Any]
                   ) -> dict[str, tuple[ChannelMoments, ChannelMoments]]:
    """One pass over `batches`: the input and output moments of every reader."""
    moments = {name: (ChannelMoments(), ChannelMoments()) for name in readers}

    def hook_for(name: str, axis: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                moments[name][0].add(inputs[0], axis)
                moments[name][1].add(output, axis)
        return hook

    eval_raw_forward_batches(model, {layer: hook_for(name, -1 if isinstance(layer, nn.Linear) else 1)
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
