"""The quantizable layers of any model ("sites") and the order a forward calls them.

Every quantizable weight is a `Site`: a Linear, a Conv1d/Conv2d (grouped and depthwise included) or the
in-projection of an `nn.MultiheadAttention` (query/key/value rows).
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.format.layers import QuantizedWeight

__all__ = ["Site", "find_sites", "matches", "call_order", "call_name", "no_fastpath", "Stop", "DATA_FREE_KINDS",
           "DATA_FREE_TYPES"]


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


class Stop(Exception):
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



def call_name(site: Site) -> str:
    """The module whose call marks the site's use: the site's own, or its attention's for an out_proj."""
    return site.parent if site.kind == "mha_out" and site.parent is not None else site.name


