"""Channels-last layout for the passes of quantization and recovery on CPU (opt-in: COMPRESS_CHANNELS_LAST=1).

oneDNN's CPU convolutions run about 1.6x faster on channels-last (NHWC) weights than on the default NCHW
layout (timm resnet50 forward of 16 crops at 224 px, 2 threads: 1.42 -> 0.89 s; forward + backward 2.81 ->
2.36 s; `compress shrink` of resnet50 at 4 bits 10:21 -> 7:56). The logits agree to a relative 2e-7, yet
ImageNet MobileNetV2 shrunk at 4 bits kept the original's answers less often on 3 of 4 calibration seeds and
had a higher KL on all 4 (docs/BENCHMARKS.md, session 6), for a reason not found yet. So it is off by default.
The model's 4-D tensors are back in the default layout on exit, so what is saved or handed back is unchanged
in form.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["channels_last_on_cpu"]


def _wants_channels_last(model: nn.Module) -> bool:
    if os.environ.get("COMPRESS_CHANNELS_LAST", "0") != "1":
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextmanager
def channels_last_on_cpu(*models: nn.Module) -> Iterator[None]:
    """With COMPRESS_CHANNELS_LAST=1, within the block the 4-D weights and buffers of each CPU model with a Conv2d
    are channels-last; on exit they are contiguous in the default layout again. Otherwise nothing changes."""
    switched = [m for m in models if m is not None and _wants_channels_last(m)]
    for model in switched:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for model in switched:
            model.to(memory_format=torch.contiguous_format)
