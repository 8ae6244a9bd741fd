"""One traced forward pass: which tensor op ran where, at which stride, with which channel splits.

The pruning analysis needs three facts that `torch_pruning` does not record (or records wrongly):

- the output stride of every layer (input side / feature-map side), for grouping layers by scale;
- every `split` / `chunk` / `unbind` / slice along the channel axis, with its sizes and the module whose
  `forward` called it (torch-pruning maps the parts of a split by consumer order, not by part index);
- the sizes of every `torch.cat` along the channel axis.

`record_ops` is a `TorchFunctionMode` that sees these calls while torch-pruning traces the model, so the
autograd nodes it stores can be matched to what we saw (by `grad_fn` identity).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from compress.models.protocol import flat_tensors, raw_forward


# ----------------------------------------------------------------------------------------------------
# Layer trace: output stride and work of every module with weights.


@dataclass
class LayerInfo:
    """What one forward pass showed of a module (summed over calls when the module is reused)."""

    name: str
    type: str
    stride: int | None  # input side / side of the last conv feature map; None: global (1x1) or none yet
    out_shape: tuple[int, ...]
    calls: int = 1
    positions: int = 1  # output positions per sample (H*W, or tokens), summed over calls
    order: int = 0  # execution order of the first call


def trace_layers(model: nn.Module, x: torch.Tensor) -> dict[str, LayerInfo]:
    """Run `raw_forward(model, x)` once and return a `LayerInfo` for every module that owns parameters."""
    side = x.shape[-1]
    infos: dict[str, LayerInfo] = {}
    state = {"stride": None}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            tensors = flat_tensors(output)
            if not tensors:
                return
            out = tensors[0]
            if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) and out.ndim == 4:
                # NCHW by definition; a 1x1 map after global pooling has no scale ("global")
                state["stride"] = None if out.shape[-1] == 1 and side > 1 else max(1, round(side / out.shape[-1]))
            if isinstance(module, nn.modules.conv._ConvNd):
                positions = int(out[0, 0].numel())
            else:  # tokens / pixels of a channels-last tensor: every dim but batch and the last
                positions = int(out[0].numel() // max(1, out.shape[-1])) if out.ndim >= 2 else 1
            info = infos.get(name)
            if info is None:
                infos[name] = LayerInfo(name, type(module).__name__, state["stride"], tuple(out.shape),
                                        positions=positions, order=len(infos))
            else:
                info.calls += 1
                info.positions += positions
                if state["stride"] is not None and (info.stride is None or state["stride"] < info.stride):
                    info.stride = state["stride"]
        return record

    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw_forward(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return infos


# ----------------------------------------------------------------------------------------------------
# Op recording: splits, slices and concats along the channel axis.

_SPLITS = {torch.split: "split", torch.Tensor.split: "split", torch.chunk: "chunk", torch.Tensor.chunk: "chunk",
           torch.tensor_split: "tensor_split", torch.Tensor.tensor_split: "tensor_split",
           torch.unbind: "unbind", torch.Tensor.unbind: "unbind",
           torch.Tensor.split_with_sizes: "split"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


def regroups_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a reshape splits the channel axis of an NCHW map into two axes, or merges two back into it
    (what a channel shuffle does around its transpose): torch-pruning maps channels through neither."""
    split = len(before) == 4 and len(after) == 5 and after[1] * after[2] == before[1] and after[3:] == before[2:]
    merge = len(before) == 5 and len(after) == 4 and before[1] * before[2] == after[1] and before[3:] == after[2:]
    return (split or merge) and before[0] == after[0]


@dataclass
class SplitRecord:
    kind: str  # chunk | split | tensor_split | unbind
    dim: int  # normalised to >= 0
    ndim: int
    sizes: list[int]  # channels of each part along `dim`
    module: str  # innermost module whose forward made the call ("" = the model itself)

    @property
    def on_channels(self) -> bool:
        """Whether the split cuts the feature axis (dim 1 of a 2-D/4-D map, last of a token tensor)."""
        return self.dim == 1 if self.ndim in (2, 4) else (self.ndim == 3 and self.dim == 2)

    @property
    def equal_chunks(self) -> bool:
        return self.kind == "chunk" and len(set(self.sizes)) == 1


@dataclass
class OpRecords:
    splits: dict[Any, SplitRecord] = field(default_factory=dict)  # grad_fn of the parts -> record
    cats: dict[Any, tuple[int, list[int]]] = field(default_factory=dict)  # grad_fn -> (dim, sizes)
    reshapes: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # grad_fn -> shapes
    keep_alive: list[Any] = field(default_factory=list)  # the grad_fns, so their ids stay unique


class _RecordMode(TorchFunctionMode):
    def __init__(self, records: OpRecords, stack: list[str]) -> None:
        super().__init__()
        self.records = records
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            if func in _SPLITS and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                self._split(func, args, kwargs, out)
            elif func in _RESHAPES and isinstance(out, torch.Tensor) and out.grad_fn is not None \
                    and isinstance(args[0], torch.Tensor):
                self.records.reshapes[out.grad_fn] = (tuple(args[0].shape), tuple(out.shape))
                self.records.keep_alive.append(out.grad_fn)
            elif func in _CATS and isinstance(out, torch.Tensor) and out.grad_fn is not None:
                tensors = args[0] if args else kwargs.get("tensors")
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
                dim = dim % out.ndim
                self.records.cats[out.grad_fn] = (dim, [int(t.shape[dim]) for t in tensors])
                self.records.keep_alive.append(out.grad_fn)
        except Exception:  # recording must never change what the model computes
            pass
        return out

    def _split(self, func, args, kwargs, out) -> None:
        source = args[0]
        kind = _SPLITS[func]
        if kind == "unbind":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        else:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = dim % source.ndim
        sizes = [1] * len(out) if kind == "unbind" else [int(t.shape[dim]) for t in out]
        grad_fn = out[0].grad_fn
        if grad_fn is not None:
            self.records.splits[grad_fn] = SplitRecord(kind, dim, source.ndim, sizes, self.stack[-1] if self.stack else "")
            self.records.keep_alive.append(grad_fn)


@contextlib.contextmanager
def record_ops(model: nn.Module) -> Iterator[OpRecords]:
    """Record channel splits and concats of every forward run inside the block (with module names)."""
    records = OpRecords()
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module: nn.Module, inputs: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with _RecordMode(records, stack):
            yield records
    finally:
        for h in handles:
            h.remove()
