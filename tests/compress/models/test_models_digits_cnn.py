"""`compress:digits-cnn` learns sklearn's digits (32x32 RGB, as the `digits` source serves them) to >= 97 %."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.models import build_model


def _digits_32px() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float [N, 3, 32, 32] in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def test_shapes_and_structure() -> None:
    model = build_model("compress:digits-cnn", num_classes=10)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 200_000


@pytest.mark.slow
def test_reaches_97_percent_quickly() -> None:
    torch.manual_seed(0)
    x, y = _digits_32px()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    val, train = order[:360], order[360:]
    model = build_model("compress:digits-cnn", num_classes=10)
    # channels-last (NHWC) layout: the same network and steps, ~25 % less CPU in oneDNN's convolutions
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    epochs, bs = 4, 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * math.ceil(len(train) / bs),
                                                pct_start=0.15)
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train))].split(bs):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[val]).argmax(1) == y[val]).float().mean().item()
    print(f"digits-cnn val accuracy after {epochs} epochs: {acc:.4f}")
    assert acc >= 0.97
