"""Which feature maps to distil: by default the last block of each run of equal feature scale.

Blocks are the modules at most two levels deep that output a [B, C, H, W] map (H, W > 1), in execution
order; a block whose output is its parent's output is named by the parent. Going down the backbone and
back up a neck, the stride changes at every scale, so one block per (scale, part of the network) is taken,
which is what Chu et al. distil (nine YOLOv4 blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.models.protocol import eval_forward_with_hooks


@dataclass(frozen=True)
class DistillLayer:
    name: str
    stride: int
    role: str  # "backbone" (on the way down), "neck" (after the first coarsest map), or "coarsest"


def _image_side(example_input: Any) -> int:
    return (example_input[0] if isinstance(example_input, (list, tuple)) else example_input).shape[-1]


@torch.no_grad()
def trace_blocks(model: nn.Module, example_input: Any, depth: int = 2) -> list[tuple[str, int]]:
    """(name, stride) of the blocks (see module docstring) in execution order."""
    side = _image_side(example_input)
    seen: list[tuple[str, int, int]] = []
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            def hook(_m: nn.Module, _i: tuple, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) > 1:
                    seen.append((name, max(1, round(side / out.shape[-1])), out.data_ptr()))
            handles.append(module.register_forward_hook(hook))
    eval_forward_with_hooks(model, example_input, handles)
    by_name = {name: ptr for name, _, ptr in seen}
    blocks: list[tuple[str, int]] = []
    stands_for_child: set[str] = set()
    for name, stride, ptr in seen:  # children fire before their parent
        parent = name.rpartition(".")[0]
        if parent in by_name and by_name[parent] == ptr:
            stands_for_child.add(parent)  # the parent, recorded next, stands for this child
            continue
        if name not in stands_for_child and any(other.startswith(name + ".") for other, _ in blocks):
            continue  # a container whose parts are already blocks
        blocks.append((name, stride))
    return blocks


def auto_layers(model: nn.Module, example_input: Any, min_stride: int | None = None) -> list[DistillLayer]:
    """The last block of each run of equal stride, from `min_stride` on (default 4; 2 for inputs <= 64 px)."""
    if min_stride is None:
        min_stride = 2 if _image_side(example_input) <= 64 else 4
    blocks = trace_blocks(model, example_input)
    if not blocks:
        return []
    coarsest = max(s for _, s in blocks)
    first_coarsest = next(i for i, (_, s) in enumerate(blocks) if s == coarsest)
    chosen: list[DistillLayer] = []
    for i, (name, stride) in enumerate(blocks):
        last_of_run = i + 1 == len(blocks) or blocks[i + 1][1] != stride
        if stride >= min_stride and last_of_run:
            role = "coarsest" if stride == coarsest else ("backbone" if i < first_coarsest else "neck")
            chosen.append(DistillLayer(name, stride, role))
    return chosen
