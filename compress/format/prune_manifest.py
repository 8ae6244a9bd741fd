"""The shape manifest: what pruning changed, as JSON, so the stock builder can be turned into the pruned
model again without pickle (`apply_manifest`, registered as the checkpoint restorer "prune").

    {"version": 1,
     "modules": {"<module path>": {"type": "Conv2d",
                                    "attrs": {"in_channels": 12, "out_channels": 24, "groups": 1},
                                    "params": {"weight": [24, 12, 3, 3], "bias": [24]},
                                    "buffers": {}}, ...}}

A module is listed when one of its own parameters / buffers changed shape (or appeared, e.g. a bias
added by folding) or one of its size attributes changed. `attrs` holds the size attributes a forward
pass reads (channels, features, groups, heads, `normalized_shape`, ...). The tensors are created empty
with the recorded shapes; the checkpoint's tensors then fill them. The chunk handling of the prune stage
does not rewrite modules, so widths are the whole story.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from compress.errors import PruneError

VERSION = 1
SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "normalized_shape", "num_channels", "num_groups", "num_parameters", "embedding_dim", "num_heads",
              "attn_dim", "head_dim", "embed_dim", "kdim", "vdim", "hidden_size", "input_size")


def _attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    own = vars(module)
    for attr in SIZE_ATTRS:
        if attr not in own:  # properties computed from sub-modules follow them
            continue
        value = own[attr]
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[attr] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            out[attr] = list(value)
    return out


def _tensors(module: nn.Module) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    params = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
    buffers = {n: list(b.shape) for n, b in module.named_buffers(recurse=False)}
    return params, buffers


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shapes and size attributes of every module (taken before pruning, to diff against)."""
    return {name: {"type": type(m).__name__, "attrs": _attrs(m), "tensors": _tensors(m)}
            for name, m in model.named_modules()}


def make_manifest(before: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    """The manifest of every module whose shapes differ from the `snapshot` taken before."""
    modules = {}
    for name, m in model.named_modules():
        old = before.get(name)
        attrs, (params, buffers) = _attrs(m), _tensors(m)
        if old is not None and old["attrs"] == attrs and old["tensors"] == (params, buffers):
            continue
        modules[name] = {"type": type(m).__name__, "attrs": attrs, "params": params, "buffers": buffers}
    return {"version": VERSION, "modules": modules}


def merge_manifests(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """Manifest of two prunes in a row (entries hold absolute shapes, so the later one wins)."""
    if not first:
        return second
    return {"version": VERSION, "modules": {**first.get("modules", {}), **second["modules"]}}


def apply_manifest(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Give a freshly built stock model the pruned shapes of `manifest` (tensors uninitialised; load a
    state dict afterwards). Raises PruneError naming the module when the model does not match."""
    version = manifest.get("version")
    if version != VERSION:
        raise PruneError(f"prune manifest version {version!r} is not supported (this build reads version {VERSION})")
    modules = dict(model.named_modules())
    for name, entry in manifest["modules"].items():
        module = modules.get(name)
        if module is None:
            raise PruneError(f"prune manifest: module '{name}' does not exist in {type(model).__name__} "
                             "(was the checkpoint made from another model spec?)")
        if type(module).__name__ != entry["type"]:
            raise PruneError(f"prune manifest: module '{name}' is a {type(module).__name__}, the manifest "
                             f"expects a {entry['type']}")
        for attr, value in entry["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        with torch.no_grad():
            for pname, shape in entry["params"].items():
                old = getattr(module, pname, None)
                like = old if isinstance(old, torch.Tensor) else next(iter(module.parameters()), None)
                dtype = like.dtype if like is not None else torch.float32
                device = like.device if like is not None else None
                requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else True
                setattr(module, pname, nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                    requires_grad=requires_grad))
            for bname, shape in entry["buffers"].items():
                old = getattr(module, bname, None)
                if not isinstance(old, torch.Tensor):
                    raise PruneError(f"prune manifest: module '{name}' has no buffer '{bname}'")
                persistent = bname not in getattr(module, "_non_persistent_buffers_set", set())
                module.register_buffer(bname, torch.empty(shape, dtype=old.dtype, device=old.device),
                                       persistent=persistent)
    return model
