"""Parameters, MACs and storage size of a model.

A module that stores its weights in a compact form (e.g. a quantized layer) reports its own storage by
defining `storage_bytes() -> int` and `dense_param_count() -> int`; everything else counts as stored
dense at its dtype.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    """Weights the model represents (dense count, also for compact layers)."""
    total = 0
    for module in model.modules():
        if hasattr(module, "dense_param_count"):
            total += module.dense_param_count()
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def storage_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes needed to store the model's parameters (and buffers, e.g. BN statistics) as they are held."""
    total = 0
    for module in model.modules():
        if hasattr(module, "storage_bytes"):
            total += module.storage_bytes()
            continue
        tensors = list(module.parameters(recurse=False)) + (list(module.buffers(recurse=False)) if buffers else [])
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _count_compact_like_base(model: nn.Module) -> None:
    """torch-pruning's counter looks hooks up by exact type: give each compact layer class in `model` (a
    quantized layer: a subclass of its stock class with `_quant_base`) the hook of its stock class, right
    before counting, so MACs never depend on when the class was made or registered. Those hooks read the
    module's size attributes and output shape only, never its (decoded) weight."""
    import torch_pruning as tp  # here, not at import: torch-pruning brings timm and torchvision (seconds)

    mapping = tp.utils.op_counter.MODULES_MAPPING
    for module in model.modules():
        cls = type(module)
        base = getattr(cls, "_quant_base", None)
        if base is not None and cls not in mapping and base in mapping:
            mapping[cls] = mapping[base]


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass on `example_input` (torch-pruning's counter); a quantized
    layer counts like its stock layer of the same shape."""
    import torch_pruning as tp

    _count_compact_like_base(model)
    was_training = model.training
    model.eval()
    try:
        # a list input (torchvision detectors) must reach forward as one argument
        macs, _ = tp.utils.count_ops_and_params(model, (example_input,) if isinstance(example_input, list) else example_input)
    finally:
        model.train(was_training)
    return int(macs)


def measure(model: nn.Module, example_input: Any) -> dict[str, float]:
    """params, macs, size_bytes (parameters + buffers) and bits_per_weight: every stored tensor's bits (buffers such
    as BN statistics included) over the parameter count."""
    params = count_params(model)
    return {"params": params, "macs": count_macs(model, example_input), "size_bytes": storage_bytes(model),
            "bits_per_weight": round(8 * storage_bytes(model) / max(params, 1), 4)}
