"""Channels-last layout for the passes of quantization and recovery on CPU, by scope.

oneDNN's CPU convolutions run faster on channels-last (NHWC) weights than on the default NCHW layout (timm
resnet50, 16 crops at 224 px, 2 threads: forward 1.42 -> 0.89 s, forward + backward 2.81 -> 2.36 s). The logits
agree to a relative 2e-7, but JLCM's per-layer fits are ill-conditioned enough that such rounding picks other
near-equal solutions: with the layout on everywhere, ImageNet MobileNetV2 shrunk at 4 bits had a higher KL on 4
of 4 calibration seeds (docs/BENCHMARKS.md, session 6). So by default it is on only for
- "sensitivity": the passes that rank layers for the bit plan, a discrete choice that such rounding does not
  move (MobileNetV2's 4-bit figures on four calibration seeds are unchanged to every digit with it on);
- "recovery": the label-free distillation after pruning, Adam steps whose rounding is noise of the same order as
  another thread count's;
and off for "fit" (the statistics and the JLCM learning). COMPRESS_CHANNELS_LAST=1 turns every scope on, =0 every
scope off. The model's 4-D tensors are back in the default layout on exit, so what is saved or handed back is
unchanged in form.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn as nn

__all__ = ["channels_last_on_cpu", "DEFAULT_SCOPES"]

Scope = Literal["sensitivity", "fit", "recovery"]
DEFAULT_SCOPES: frozenset[str] = frozenset({"sensitivity", "recovery"})


def _scope_on(scope: Scope) -> bool:
    value = os.environ.get("COMPRESS_CHANNELS_LAST", "")
    if value == "0":
        return False
    return value == "1" or scope in DEFAULT_SCOPES


def _wants_channels_last(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # already switched by an enclosing block: leave it to that block to switch back
    return bool(convs) and all(c.weight.is_contiguous() for c in convs)


@contextmanager
def channels_last_on_cpu(*models: nn.Module, scope: Scope, probe: Callable[[], Any] | None = None) -> Iterator[None]:
    """Within the block the 4-D weights and buffers of each CPU model with a Conv2d are channels-last when
    `scope` is on (see the module docstring); on exit they are contiguous in the default layout again.
    `probe` (e.g. one forward pass) is run once switched; if it raises, the models go back to the default layout
    for the block: model code that assumes it (`x.view(B, -1)` on a conv output) keeps working."""
    on = _scope_on(scope)
    switched = [m for m in models if on and m is not None and _wants_channels_last(m)]
    for model in switched:
        _set_layout(model, torch.channels_last)
    if switched and probe is not None:
        try:
            with torch.no_grad():
                probe()
        except RuntimeError:
            for model in switched:
                _set_layout(model, torch.contiguous_format)
            switched = []
    try:
        yield
    finally:
        for model in switched:
            _set_layout(model, torch.contiguous_format)


def _set_layout(model: nn.Module, memory_format: torch.memory_format) -> None:
    """The 4-D parameters and buffers of `model` in `memory_format`. Not `model.to(memory_format=...)`, which
    also tries 5-D tensors and fails on them (timm's lambda_resnet26t has 5-D position embeddings)."""
    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=memory_format)
            for name, b in module._buffers.items():
                if b is not None and b.dim() == 4:
                    module._buffers[name] = b.contiguous(memory_format=memory_format)
