"""Collecting the input statistics of the quantizable layers from calibration data.

Inputs are caught with forward pre-hooks; a forward is stopped right after the layer of interest has seen its
input, so collecting a layer's inputs costs the model up to that layer only. Conv inputs are sampled at random
output positions (at most `max_samples` rows per layer in all), and only those patches are gathered, so memory
stays small.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.quant.pooled import MapCatcher
from compress.quant.replay import Replay
from compress.quant.sites import Site, Stop, call_name, no_fastpath
from compress.quant.stats import LayerStats

__all__ = ["collect_stats", "FloatInputs", "sample_patches"]


def _pair(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def sample_patches(conv: nn.Module, x: torch.Tensor, count: int | None, generator: torch.Generator) -> torch.Tensor:
    """Input patches of a Conv1d/Conv2d at `count` random output positions (all when None): [g, n, C_in/g*k]."""
    if x.dim() == 3:  # conv1d: a 2-D conv of height 1
        x = x.unsqueeze(2)
        kernel, stride = (1, *_pair(conv.kernel_size, 1)), (1, *_pair(conv.stride, 1))
        dilation = (1, *_pair(conv.dilation, 1))
        pad = conv.padding if isinstance(conv.padding, str) else (0, *_pair(conv.padding, 1))
    else:
        kernel, stride, dilation = _pair(conv.kernel_size, 2), _pair(conv.stride, 2), _pair(conv.dilation, 2)
        pad = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding, 2)
    zero_pad = conv.padding_mode == "zeros" and not isinstance(pad, str)
    depthwise = conv.groups > 1 and conv.groups == x.shape[1]
    rows_gather = zero_pad and x.shape[1] > 1 and (x.is_contiguous(memory_format=torch.channels_last) or depthwise)
    if not zero_pad:
        rp = list(conv._reversed_padding_repeated_twice)
        rp = rp + [0, 0] if len(rp) == 2 else rp  # conv1d: no padding of the height-1 axis
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, rp, mode=mode) if any(rp) else x
        pad = (0, 0)
    elif not rows_gather:
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x
        pad = (0, 0)
    b, c, h, w = x.shape
    out_h = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = b * out_h * out_w
    if count is None or count >= total:
        pos = torch.arange(total, device=x.device)
    else:
        pos = torch.randperm(total, generator=generator)[:count].to(x.device)
    bi, rem = pos // (out_h * out_w), pos % (out_h * out_w)
    oy, ox = rem // out_w, rem % out_w
    if rows_gather and not x.is_contiguous(memory_format=torch.channels_last):  # a depthwise conv's NCHW input
        if b * h * w > 4 * pos.numel() * kernel[0] * kernel[1]:  # a few positions of a large input: no copy of it
            return _gather_depthwise(x, kernel, stride, dilation, pad, bi, oy, ox)
        x = x.contiguous(memory_format=torch.channels_last)
    if rows_gather:
        return _gather_rows(x, kernel, stride, dilation, pad, conv.groups, bi, oy, ox)
    # windows as a view [b, c, out_h, out_w, kh, kw] (dilated: every dilation-th of a wider window), then
    # one gather of the n chosen ones
    span = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    windows = x.unfold(2, span[0], stride[0]).unfold(3, span[1], stride[1])[:, :, :out_h, :out_w]
    if dilation != (1, 1):
        windows = windows[..., :: dilation[0], :: dilation[1]]
    groups = conv.groups
    if groups == 1:
        return windows[bi, :, oy, ox].reshape(1, pos.numel(), -1)  # [1, n, C_in * kh * kw]
    patches = windows.transpose(0, 1)[:, bi, oy, ox]  # [c, n, kh, kw]
    per = c // groups
    patches = patches.reshape(groups, per, pos.numel(), -1)
    if per == 1:  # depthwise
        return patches[:, 0]
    return patches.transpose(1, 2).reshape(groups, pos.numel(), -1)  # [g, n, C_in/g * kh * kw]


def _taps(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
          pad: tuple[int, ...], oy: torch.Tensor, ox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input rows iy [kh, n, 1] and columns ix [1, n, kw] read by each kernel tap at output positions (oy, ox)
    of the unpadded input, clamped inside it, and whether each tap falls inside ([kh, n, kw])."""
    h, w = x.shape[2], x.shape[3]
    iy = (oy * stride[0] - pad[0])[None, :, None] + (torch.arange(kernel[0], device=x.device) * dilation[0])[:, None, None]
    ix = (ox * stride[1] - pad[1])[None, :, None] + (torch.arange(kernel[1], device=x.device) * dilation[1])[None, None, :]
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    return iy.clamp(0, h - 1), ix.clamp(0, w - 1), inside


def _gather_depthwise(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                      pad: tuple[int, ...], bi: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """`sample_patches` of a depthwise conv's unpadded NCHW input (zero padding), [c, n, kh * kw]: one gather
    of the chosen taps of every channel from the flat input, without copying or padding the whole of it."""
    b, c, h, w = x.shape
    iy, ix, inside = _taps(x, kernel, stride, dilation, pad, oy, ox)
    offset = (bi[None, :, None] * (c * h * w) + iy * w + ix).permute(1, 0, 2).reshape(-1)  # [n * kk], position-major
    index = offset[None, :] + (torch.arange(c, device=x.device) * (h * w))[:, None]  # [c, n * kk]
    out = x.reshape(-1).index_select(0, index.reshape(-1)).view(c, -1)
    keep = inside.permute(1, 0, 2).reshape(-1)
    if not bool(keep.all()):
        out.masked_fill_(~keep[None, :], 0.0)
    return out.view(c, bi.numel(), kernel[0] * kernel[1])


def _gather_rows(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                 pad: tuple[int, ...], groups: int, bi: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """`sample_patches` of an unpadded channels-last input (zero padding): the same values in the same layout,
    gathered as whole rows of channels per kernel tap ([b*h*w, c] is a view), with taps that fall in the
    padding set to 0. Several times faster than indexing the window view of a padded copy (depthwise convs
    above all: padding a large activation alone cost more than the gather)."""
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    iy, ix, inside = _taps(x, kernel, stride, dilation, pad, oy, ox)
    inside = inside.permute(0, 2, 1).reshape(-1)  # [kh * kw * n]: tap-major
    index = (bi[None, :, None] * (h * w) + iy * w + ix).permute(0, 2, 1).reshape(-1)
    rows = flat.index_select(0, index)  # [kh * kw * n, c]: tap-major
    if not bool(inside.all()):
        rows.masked_fill_(~inside[:, None], 0.0)
    n, kk = bi.numel(), kernel[0] * kernel[1]
    by_position = rows.view(n, c) if kk == 1 else rows.view(kk, n, c).permute(1, 2, 0).contiguous()  # [n, c, kk]
    if groups == 1:
        return by_position.reshape(1, n, c * kk)
    return by_position.reshape(n, groups, (c // groups) * kk).transpose(0, 1).contiguous()  # [g, n, C_in/g * kk]


def _rows(x: torch.Tensor, count: int | None, generator: torch.Generator) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if count is not None and count < x.shape[0]:
        x = x[torch.randperm(x.shape[0], generator=generator)[:count].to(x.device)]
    return x


def _site_input(site: Site, args: tuple, kwargs: dict, count: int | None, generator: torch.Generator) -> torch.Tensor:
    """The site's input rows [g, n, C] from the arguments of its forward call."""
    if site.kind == "conv":
        return sample_patches(site.module, args[0], count, generator)
    if site.kind == "linear":
        return _rows(args[0], count, generator)[None]
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    if k is q and v is q:
        return _rows(q, count, generator)[None]
    n = min(t.reshape(-1, t.shape[-1]).shape[0] for t in (q, k, v))
    count = n if count is None else min(count, n)
    return torch.stack([_rows(t, count, generator) for t in (q, k, v)])


def _capture(model: nn.Module, sites: list[Site], batch: Any, counts: dict[str, int],
             quota: dict[str, int | None], seed: int, stop: bool, replay: Replay | None = None,
             index: int = 0, moments: dict[str, tuple[torch.Tensor, int]] | None = None) -> dict[str, torch.Tensor]:
    """Run `model(batch)` and return the input rows of each site (named as in `model`); the forward stops
    early once all are caught when `stop` allows (each site then called as often as `counts` says). With
    `replay` (recorded for batch number `index`), modules that finished before the first site replay their
    outputs of an earlier pass. `moments`: for the linear sites it names, set to the within-map moment of the
    feature map their input is the spatial mean of (compress.quant.pooled), where there is one."""

    def forward() -> dict[str, torch.Tensor]:
        caught: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        handles = []
        found: dict[str, tuple[torch.Tensor, int]] = {}
        catchers = {s.name: MapCatcher(model, s.weight.shape[1]) for s in sites
                    if moments is not None and s.name in moments and s.kind == "linear"}

        def done() -> bool:
            return stop and all(len(caught[s.name]) >= max(counts.get(s.name, 1), 1) for s in sites)

        for site in sites:
            # positions drawn per (seed, batch, layer name): the float and the quantized model sample the same ones
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(site.name.encode())) % (1 << 62))
            if site.kind == "mha_out":
                handles += _hook_out_proj(model, site, caught[site.name], quota[site.name], gen, done)
                continue

            def hook(_m: nn.Module, args: tuple, kwargs: dict, site: Site = site, gen: torch.Generator = gen) -> None:
                if site.name in catchers and site.name not in found:
                    moment = catchers[site.name].moment(args[0])
                    if moment is not None:
                        found[site.name] = moment
                caught[site.name].append(_site_input(site, args, kwargs, quota[site.name], gen).detach())
                if done():
                    raise Stop

            handles.append(model.get_submodule(site.name).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad(), no_fastpath():
                model(batch)
        except Stop:
            pass
        finally:
            for h in handles:
                h.remove()
            for catcher in catchers.values():
                catcher.remove()
        if moments is not None:  # the last forward's (a replay may check its first against a plain one)
            moments.update({name: found.get(name) for name in moments})
        return {name: torch.cat(parts, dim=1) for name, parts in caught.items() if parts}

    if replay is None:
        return forward()
    return replay.run(index, replay.cutoff([call_name(s) for s in sites]), forward)



def _hook_out_proj(model: nn.Module, site: Site, sink: list[torch.Tensor], count: int | None,
                   gen: torch.Generator, done: Callable[[], bool]) -> list[Any]:
    """Catch the input of an attention's out_proj: run the attention with out_proj = identity (bias 0), take
    its output, then restore the weights and apply the real projection to that output."""
    attention = model.get_submodule(site.parent)
    proj = attention.out_proj
    saved: dict[str, torch.Tensor] = {}

    def pre(_m: nn.Module, _a: tuple) -> None:
        saved["w"] = proj.weight.data.clone()
        proj.weight.data.copy_(torch.eye(proj.weight.shape[0], dtype=proj.weight.dtype, device=proj.weight.device))
        if proj.bias is not None:
            saved["b"] = proj.bias.data.clone()
            proj.bias.data.zero_()

    def post(_m: nn.Module, _a: tuple, output: Any) -> Any:
        proj.weight.data.copy_(saved["w"])
        if proj.bias is not None:
            proj.bias.data.copy_(saved["b"])
        attended = output[0] if isinstance(output, tuple) else output
        sink.append(_rows(attended, count, gen)[None].detach())
        if done():
            raise Stop
        projected = F.linear(attended, proj.weight, proj.bias)
        return (projected, *output[1:]) if isinstance(output, tuple) else projected

    return [attention.register_forward_pre_hook(pre), attention.register_forward_hook(post)]


def _quota(sites: list[Site], batches: list[Any], counts: dict[str, int], max_samples: int) -> dict[str, int | None]:
    """Input rows to sample per batch and per call of each site (max_samples per layer in all)."""
    per_batch = max(1, -(-max_samples // max(len(batches), 1)))
    return {s.name: max(1, per_batch // max(counts.get(s.name, 1), 1)) for s in sites}


def collect_stats(float_model: nn.Module, quant_model: nn.Module | None, sites: list[Site], batches: list[Any],
                  counts: dict[str, int], max_samples: int, seed: int = 0,
                  float_inputs: dict[str, list[torch.Tensor | None]] | None = None,
                  replay: Replay | None = None, pooled: dict[str, float] | None = None) -> dict[str, LayerStats]:
    """Input moments of `sites` over `batches`: inputs x_q from `quant_model` (None: the float model's) and
    targets' inputs x_f from `float_model` (or `float_inputs`, per site and batch, e.g. from `FloatInputs`),
    at the same sampled positions. Sites name modules of both models; `replay` (of `quant_model`) skips what
    earlier passes computed. `pooled` (site name -> strength): a linear site fed the spatial mean of a feature map
    gets that map's within-image moment (of the x_q model) as a prior (compress.quant.pooled)."""
    quota = _quota(sites, batches, counts, max_samples)
    stats: dict[str, LayerStats] = {}
    priors: dict[str, list[tuple[torch.Tensor, int] | None]] = {name: [] for name in pooled or {}}
    stop = all(counts.get(s.name, 0) >= 1 for s in sites)
    for i, batch in enumerate(batches):
        caught: dict[str, tuple[torch.Tensor, int]] | None = dict.fromkeys(priors) if priors else None
        if float_inputs is not None:
            xf = {s.name: float_inputs[s.name][i] for s in sites if float_inputs[s.name][i] is not None}
        else:
            xf = _capture(float_model, sites, batch, counts, quota, seed * 7919 + i, stop,
                          moments=caught if quant_model is None else None)
        xq = xf if quant_model is None else _capture(quant_model, sites, batch, counts, quota, seed * 7919 + i, stop,
                                                     replay, i, moments=caught)
        for name, moment in (caught or {}).items():
            priors[name].append(moment)
        for site in sites:
            if site.name not in xf or site.name not in xq:
                continue
            a, b = xq[site.name], xf[site.name]
            if site.name not in stats:
                stats[site.name] = LayerStats.zeros(a.shape[0], a.shape[2], a.device, weight=site.weight)
            stats[site.name].add(a, None if quant_model is None else b)
    out = {name: st.finalize() for name, st in stats.items()}
    for name, parts in priors.items():
        if name in out and parts and all(p is not None for p in parts):  # every batch's input was such a mean
            moment = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
            out[name] = out[name].with_prior(moment.float(), pooled[name])
    return {name: st.expand(next(s.input_groups for s in sites if s.name == name)) for name, st in out.items()}


class FloatInputs:
    """The float model's sampled inputs of the next layers, caught in one pass over the batches for as many
    layers (in call order) as fit in `budget_bytes`; the sequential walk then runs the float model once per
    window instead of once per layer (and, with `replay`, each window's pass only from where the last one
    stopped). `get(site)` hands a layer's inputs over (and forgets them)."""

    def __init__(self, float_model: nn.Module, sites: list[Site], batches: list[Any], counts: dict[str, int],
                 max_samples: int, seed: int, budget_bytes: int, replay: Replay | None = None) -> None:
        self.model, self.sites, self.batches, self.counts = float_model, sites, batches, counts
        self.replay = replay
        self.quota = _quota(sites, batches, counts, max_samples)
        self.seed, self.budget = seed, budget_bytes
        self.cache: dict[str, list[torch.Tensor | None]] = {}
        self.passes = 0

    def _bytes(self, site: Site) -> int:
        """Upper bound of the cached inputs of a site: groups x rows x columns x 4 bytes x batches."""
        weight = site.weight
        cols = weight.shape[1] * (math.prod(weight.shape[2:]) if site.kind == "conv" else 1)
        groups = site.input_groups
        return groups * (self.quota[site.name] or 1) * max(self.counts.get(site.name, 1), 1) * cols * 4 * len(self.batches)

    def get(self, site: Site) -> list[torch.Tensor | None]:
        if site.name not in self.cache:
            self._fill(self.sites.index(site))
        return self.cache.pop(site.name)

    def _fill(self, start: int) -> None:
        window, total = [], 0
        for site in self.sites[start:]:
            if not self.counts.get(site.name):
                continue
            size = self._bytes(site)
            if window and total + size > self.budget:
                break
            window.append(site)
            total += size
        self.cache = {s.name: [] for s in window}
        for i, batch in enumerate(self.batches):
            xf = _capture(self.model, window, batch, self.counts, self.quota, self.seed * 7919 + i, stop=True,
                          replay=self.replay, index=i)
            for s in window:
                self.cache[s.name].append(xf.get(s.name))
        self.passes += 1


