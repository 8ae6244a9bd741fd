"""Finding the quantizable layers of any model and collecting their input statistics from calibration data.

Every quantizable weight is a `Site`: a Linear, a Conv1d/Conv2d (grouped and depthwise included) or the
in-projection of an `nn.MultiheadAttention` (query/key/value rows). Inputs are caught with forward
pre-hooks; a forward is stopped right after the layer of interest has seen its input, so collecting a
layer's inputs costs the model up to that layer only. Conv inputs are sampled at random output positions
(at most `max_samples` rows per layer in all), and only those patches are gathered, so memory stays small.
`Replay` makes the layer-by-layer walk cost about one forward in all instead of one per layer: the modules
that returned before the first layer changed since the last pass give back their recorded outputs.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.quant.layers import QuantizedWeight
from compress.quant.stats import LayerStats

__all__ = ["Site", "find_sites", "matches", "to_device", "collect_stats", "FloatInputs", "call_order", "model_outputs",
           "no_fastpath", "sample_patches", "Replay", "call_name"]


@dataclass
class Site:
    """One quantizable weight: `module.<attr>` of the module called `name`."""

    name: str
    module: nn.Module
    attr: str
    kind: str  # "linear", "conv", "mha" (attention in-projection), "mha_out" (its out_proj), or a data-free kind
    #            (DATA_FREE_KINDS: embedding, conv_transpose, conv3d: quantized without input statistics)
    parent: str | None = None  # mha_out: the attention module, whose forward reads out_proj.weight directly

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def input_groups(self) -> int:
        """Blocks of rows that see different inputs: conv groups, or query/key/value for attention."""
        if self.kind == "conv":
            return self.module.groups
        return 3 if self.kind == "mha" else 1


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches any pattern: exact, glob ('head.*'), or regex with 're:' (full match)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def find_sites(model: nn.Module, ignore: Sequence[str] = ()) -> list[Site]:
    """Quantizable weights of `model` not matched by `ignore`, in module order (already quantized: skipped)."""
    sites = []
    attention = {f"{n}.out_proj" if n else "out_proj": n for n, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeight) or matches(name, ignore):
            continue
        if name in attention and isinstance(module, nn.Linear) and isinstance(module.weight, nn.Parameter):
            sites.append(Site(name, module, "weight", "mha_out", parent=attention[name]))
        elif isinstance(module, nn.MultiheadAttention):
            if module._qkv_same_embed_dim and isinstance(module.in_proj_weight, nn.Parameter):
                sites.append(Site(name, module, "in_proj_weight", "mha"))
        elif isinstance(module, nn.Linear) and isinstance(module.weight, nn.Parameter):
            sites.append(Site(name, module, "weight", "linear"))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and isinstance(module.weight, nn.Parameter):
            sites.append(Site(name, module, "weight", "conv"))
        elif isinstance(module, DATA_FREE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            sites.append(Site(name, module, "weight", _data_free_kind(module)))
    return sites


# Weight-bearing layers quantized without input statistics (their weights are rows of a matrix all the same):
# embedding tables (a row per token), transposed convs and 3-D convs (no patch sampling for them yet)
DATA_FREE_TYPES = (nn.Embedding, nn.EmbeddingBag, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d)
DATA_FREE_KINDS = ("embedding", "conv_transpose", "conv3d")


def _data_free_kind(module: nn.Module) -> str:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "conv3d" if isinstance(module, nn.Conv3d) else "conv_transpose"


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (tensor, tuple, list or dict of them) to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Turn off the fused attention/encoder fast path, which bypasses the submodules' forward (and hooks)."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        yield
        return
    before = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(before)


def model_outputs(output: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, list/tuple/dict of them, nested), flattened in order."""
    if torch.is_tensor(output):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in model_outputs(o)]
    if isinstance(output, dict):
        return [t for k in sorted(output) for t in model_outputs(output[k])]
    return []


class _Stop(Exception):
    """Raised by a hook to end a forward once the wanted inputs are caught."""


def call_order(model: nn.Module, sites: list[Site], batch: Any) -> tuple[list[Site], dict[str, int]]:
    """Sites in the order the forward first calls them (never-called sites last) and their call counts."""
    first: dict[str, int] = {}
    counts: dict[str, int] = {s.name: 0 for s in sites}
    handles = []
    for site in sites:
        def hook(_m: nn.Module, _a: Any, name: str = site.name) -> None:
            counts[name] += 1
            first.setdefault(name, len(first))
        handles.append(site.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), no_fastpath():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    for site in sites:  # out_proj is used inside its attention's forward, right after the in-projection
        if site.kind == "mha_out" and site.parent is not None:
            parent = model.get_submodule(site.parent)
            counts[site.name] = _calls_of(parent, model, batch) if site.parent not in counts else counts[site.parent]
            if site.parent in first or counts[site.name]:
                first[site.name] = first.get(site.parent, len(first)) + 0.5
    ordered = sorted(sites, key=lambda s: first.get(s.name, len(sites) + sites.index(s)))
    return ordered, counts


def _calls_of(module: nn.Module, model: nn.Module, batch: Any) -> int:
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with torch.no_grad(), no_fastpath():
            model(batch)
    finally:
        handle.remove()
    return calls[0]


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
    if conv.padding_mode != "zeros" or isinstance(pad, str):
        rp = list(conv._reversed_padding_repeated_twice)
        rp = rp + [0, 0] if len(rp) == 2 else rp  # conv1d: no padding of the height-1 axis
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, rp, mode=mode) if any(rp) else x
    else:
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x
    b, c, h, w = x.shape
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = b * out_h * out_w
    if count is None or count >= total:
        pos = torch.arange(total, device=x.device)
    else:
        pos = torch.randperm(total, generator=generator)[:count].to(x.device)
    bi, rem = pos // (out_h * out_w), pos % (out_h * out_w)
    oy, ox = rem // out_w, rem % out_w
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
             index: int = 0) -> dict[str, torch.Tensor]:
    """Run `model(batch)` and return the input rows of each site (named as in `model`); the forward stops
    early once all are caught when `stop` allows (each site then called as often as `counts` says). With
    `replay` (recorded for batch number `index`), modules that finished before the first site replay their
    outputs of an earlier pass."""

    def forward() -> dict[str, torch.Tensor]:
        caught: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        handles = []

        def done() -> bool:
            return stop and all(len(caught[s.name]) >= max(counts.get(s.name, 1), 1) for s in sites)

        for site in sites:
            # positions drawn per (seed, batch, layer name): the float and the quantized model sample the same ones
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(site.name.encode())) % (1 << 62))
            if site.kind == "mha_out":
                handles += _hook_out_proj(model, site, caught[site.name], quota[site.name], gen, done)
                continue

            def hook(_m: nn.Module, args: tuple, kwargs: dict, site: Site = site, gen: torch.Generator = gen) -> None:
                caught[site.name].append(_site_input(site, args, kwargs, quota[site.name], gen).detach())
                if done():
                    raise _Stop

            handles.append(model.get_submodule(site.name).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad(), no_fastpath():
                model(batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(parts, dim=1) for name, parts in caught.items() if parts}

    if replay is None:
        return forward()
    return replay.run(index, replay.cutoff([call_name(s) for s in sites]), forward)


def call_name(site: Site) -> str:
    """The module whose call marks the site's use: the site's own, or its attention's for an out_proj."""
    return site.parent if site.kind == "mha_out" and site.parent is not None else site.name


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
            raise _Stop
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
                  replay: Replay | None = None) -> dict[str, LayerStats]:
    """Input moments of `sites` over `batches`: inputs x_q from `quant_model` (None: the float model's) and
    targets' inputs x_f from `float_model` (or `float_inputs`, per site and batch, e.g. from `FloatInputs`),
    at the same sampled positions. Sites name modules of both models; `replay` (of `quant_model`) skips what
    earlier passes computed."""
    quota = _quota(sites, batches, counts, max_samples)
    stats: dict[str, LayerStats] = {}
    stop = all(counts.get(s.name, 0) >= 1 for s in sites)
    for i, batch in enumerate(batches):
        if float_inputs is not None:
            xf = {s.name: float_inputs[s.name][i] for s in sites if float_inputs[s.name][i] is not None}
        else:
            xf = _capture(float_model, sites, batch, counts, quota, seed * 7919 + i, stop)
        xq = xf if quant_model is None else _capture(quant_model, sites, batch, counts, quota, seed * 7919 + i, stop,
                                                     replay, i)
        for site in sites:
            if site.name not in xf or site.name not in xq:
                continue
            a, b = xq[site.name], xf[site.name]
            if site.name not in stats:
                stats[site.name] = LayerStats.zeros(a.shape[0], a.shape[2], a.device)
            stats[site.name].add(a, None if quant_model is None else b)
    return {name: st.finalize().expand(next(s.input_groups for s in sites if s.name == name)) for name, st in stats.items()}


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


class _Mismatch(Exception):
    """A replayed module was called twice in one pass: the forward does not follow the probed call order."""


def _nested(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """obj with fn applied to its tensors (tensors, tuples, lists, dicts of them, None, numbers, strings)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_nested(o, fn) for o in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _nested(v, fn) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(type(obj).__name__)


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    try:
        _nested(obj, found.append)
    except TypeError:
        pass
    return found


def _close(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = float(y.abs().max()) if y.numel() else 0.0
            if x.numel() and float((x - y).abs().max()) > 1e-4 * scale + 1e-6:
                return False
        elif not torch.equal(x, y):
            return False
    return True


class Replay:
    """Skips what an earlier forward already computed. A probe pass records the order in which the model's
    modules are called (each module's first call and last return). A module called once per forward that
    returned before the first call of every layer changed since (see `invalidate`) gives the same output
    again, so its recorded output (per batch) is returned instead of running it; only the code around the
    modules runs. Passes record the outermost modules that return before their `cutoff` (the first layer
    they need), cloned, within `budget_bytes` (entries that save the most time per byte are kept).

    Modules that alias or modify their inputs in place, are called twice, or return other objects than
    tensors (in tuples, lists, dicts) are never replayed; the first pass that replays anything is checked
    against a plain one, and any mismatch turns replay off (then every pass runs the whole model).
    """

    def __init__(self, model: nn.Module, batch: Any, budget_bytes: int) -> None:
        self.model, self.budget = model, budget_bytes
        self.entries: dict[str, dict[int, Any]] = {}
        self.sizes: dict[tuple[str, int], int] = {}
        self.used = 0
        self.blocked: set[str] = set()
        self.enabled = budget_bytes > 0
        self.verified = False
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        if self.enabled:
            self._probe(batch)

    def _probe(self, batch: Any) -> None:
        counter = [0]
        begun: dict[str, list[float]] = {}
        handles = []
        for name, module in self.model.named_modules():
            if not name:
                continue

            def pre(_m: nn.Module, _a: tuple, name: str = name) -> None:
                counter[0] += 1
                self.start.setdefault(name, counter[0])
                self.calls[name] = self.calls.get(name, 0) + 1
                begun.setdefault(name, []).append(time.perf_counter())

            def post(_m: nn.Module, _a: tuple, _o: Any, name: str = name) -> None:
                counter[0] += 1
                self.end[name] = counter[0]
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begun[name].pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with torch.no_grad(), no_fastpath():
                self.model(batch)
        finally:
            for h in handles:
                h.remove()

    def cutoff(self, names: Sequence[str]) -> float:
        """The first call, in the probed order, of any of the modules `names` (inf: none was called)."""
        return min((self.start[n] for n in names if n in self.start), default=math.inf)

    def invalidate(self, name: str) -> None:
        """Module `name` changed: drop the outputs of every module that returned after its first call."""
        first = self.start.get(name)
        if first is None:
            return
        for module in [m for m in self.entries if self.end[m] >= first]:
            self._drop(module)

    def disable(self) -> None:
        self.enabled = False
        for module in list(self.entries):
            self._drop(module)

    def _drop(self, module: str, index: int | None = None) -> None:
        batches = self.entries.get(module, {})
        for i in list(batches) if index is None else [index]:
            if i in batches:
                del batches[i]
                self.used -= self.sizes.pop((module, i))
        if not batches:
            self.entries.pop(module, None)

    def _outermost(self, cutoff: float) -> set[str]:
        """Modules called once that returned before `cutoff` and have no such ancestor."""
        ok = {n for n, e in self.end.items() if e < cutoff and self.calls.get(n) == 1 and n not in self.blocked}
        out = set()
        for name in ok:
            parts = name.split(".")
            if not any(".".join(parts[:i]) in ok for i in range(1, len(parts))):
                out.add(name)
        return out

    def _worth(self, module: str, size: int) -> float:
        return self.seconds.get(module, 0.0) / max(size, 1)

    def _store(self, module: str, index: int, output: Any) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(output))
        worth = self._worth(module, size)
        if self.used + size > self.budget:
            cheaper = sorted((self._worth(m, self.sizes[(m, i)]), m, i) for m, e in self.entries.items() for i in e)
            free = sum(self.sizes[(m, i)] for w, m, i in cheaper if w < worth)
            if self.used - free + size > self.budget:
                return
            for w, m, i in cheaper:
                if self.used + size <= self.budget or w >= worth:
                    break
                self._drop(m, i)
        self.entries.setdefault(module, {})[index] = _nested(output, torch.Tensor.clone)
        self.sizes[(module, index)] = size
        self.used += size

    @contextlib.contextmanager
    def _active(self, index: int, cutoff: float) -> Iterator[list[str]]:
        """Replay the recorded outputs of batch `index`; record the outermost modules that return before `cutoff`."""
        replayed = [m for m, e in self.entries.items() if index in e]
        saved = {m: self.entries[m][index] for m in replayed}  # entries evicted during the pass still replay in it
        record = self._outermost(cutoff) - set(replayed)
        calls: dict[str, int] = {}
        handles, patched, recorded = [], [], []

        def count(name: str) -> int:
            calls[name] = calls.get(name, 0) + 1
            return calls[name]

        for name in replayed:
            module = self.model.get_submodule(name)

            def forward(*_a: Any, name: str = name, **_k: Any) -> Any:
                if count(name) > 1:
                    raise _Mismatch(name)
                return _nested(saved[name], torch.Tensor.clone)

            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        versions: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for name in record:
            module = self.model.get_submodule(name)

            def pre(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                versions[name] = [(t, t._version) for t in _tensors((args, kwargs))]

            def post(_m: nn.Module, _a: tuple, _k: dict, output: Any, name: str = name) -> None:
                if count(name) > 1:  # called again: not the probed order
                    self.blocked.add(name)
                    self._drop(name)
                    return
                inputs = versions.pop(name, [])
                try:
                    outs = _tensors(_nested(output, lambda t: t))
                except TypeError:
                    self.blocked.add(name)
                    return
                in_place = any(t._version != v for t, v in inputs)
                ptrs = {t.untyped_storage().data_ptr() for t, _ in inputs}
                if in_place or any(o.untyped_storage().data_ptr() in ptrs for o in outs):
                    self.blocked.add(name)  # aliases or changes its inputs: replaying it would skip that
                    return
                self._store(name, index, output)
                recorded.append(name)

            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
        try:
            yield replayed
        finally:
            for h in handles:
                h.remove()
            for module, before in patched:
                if before is None:
                    del module.forward
                else:
                    module.forward = before
            for name in recorded:  # an ancestor's output now stands for its descendants'
                for inner in [m for m in self.entries if m.startswith(name + ".")]:
                    self._drop(inner, index)

    def run(self, index: int, cutoff: float, forward: Callable[[], Any]) -> Any:
        """`forward()` (a pass of the model over batch number `index`) with replay; the first pass that replays
        anything is checked against a plain run."""
        if not self.enabled:
            return forward()
        try:
            with self._active(index, cutoff) as replayed:
                out = forward()
        except _Mismatch as exc:
            warnings.warn(f"quantize: module '{exc}' was called twice in a forward (not in the probed order); "
                          "calibration passes run the whole model from now on", stacklevel=2)
            self.disable()
            return forward()
        if replayed and not self.verified:
            self.verified = True
            plain = forward()
            if not _close(out, plain):
                warnings.warn("quantize: replayed module outputs changed a forward (a module with side effects?); "
                              "calibration passes run the whole model from now on", stacklevel=2)
                self.disable()
                return plain
        return out
