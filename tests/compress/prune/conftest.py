"""Tiny networks, one per graph pattern the pruner must get right."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def cbr(c_in: int, c_out: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())


class ChunkNet(nn.Module):
    """C2f-style: conv -> chunk(2) -> bottleneck with residual on the second half -> cat(all) -> conv."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = cbr(3, 2 * c, 3)
        self.m1 = cbr(c, c, 3)
        self.m2 = cbr(c, c, 3)
        self.out = cbr(3 * c, 2 * c)
        self.head = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        y = b + self.m2(self.m1(b))
        return self.head(self.out(torch.cat([a, b, y], dim=1)))


class GroupedNet(nn.Module):
    """1x1 -> grouped 3x3 (4 groups) -> 1x1 -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 32)
        self.b = cbr(32, 32, 3, groups=4)
        self.c = cbr(32, 24)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))))


class PointwiseNet(nn.Module):
    """1x1 convs and a linear head, where folding a removed channel's constant is exact. The readers of
    removed channels: a BN right after a bias-free conv (b), a conv with a bias (c), a conv with neither
    (d: folding gives it a bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        self.c = nn.Sequential(nn.Conv2d(24, 24, 1, bias=True), nn.BatchNorm2d(24), nn.SiLU())
        self.d = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.SiLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.d(self.c(self.b(self.a(x))))
        return self.fc(x.mean((2, 3)))


class ShuffleNet(nn.Module):
    """A channel shuffle (view + transpose): torch-pruning maps it wrongly; the graph finds it by structure."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 32)
        self.b = cbr(32, 32)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.b(x))


class FlipNet(ShuffleNet):
    """Channels reversed (x.flip(1)): torch-pruning takes it for element-wise, the removal check must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x).flip(1)))


class FixedSplitNet(nn.Module):
    """split into literal sizes: the producer's channels cannot be cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 32)
        self.b = cbr(8, 16)
        self.c = cbr(24, 16)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x).split([8, 24], dim=1)
        return self.head(torch.cat([self.b(p), self.c(q)], dim=1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread gammas (like a sparse-trained model) and give BNs non-trivial statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g) ** 2
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.3
            m.running_mean.data = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


@pytest.fixture
def nets():
    return {"chunk": ChunkNet, "grouped": GroupedNet, "pointwise": PointwiseNet, "shuffle": ShuffleNet, "flip": FlipNet,
            "fixed_split": FixedSplitNet, "randomize_bn": randomize_bn}
