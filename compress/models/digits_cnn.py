"""`compress:digits-cnn`: a small BN-ReLU CNN for 32x32 RGB digits, the classification demo model."""
from __future__ import annotations

import torch
from torch import nn

from compress.models.registry import register_model


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU, the unit every stage is made of."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualStage(nn.Module):
    """Downsampling conv, then a two-conv residual block: y = x + f(x) (prunable as one coupled group)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.down = conv_bn_relu(c_in, c_out, stride)
        self.conv1 = conv_bn_relu(c_out, c_out)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return self.act(x + self.conv2(self.conv1(x)))


class DigitsCNN(nn.Module):
    """Three stages 16-32-64 (32x32 -> 32 -> 16 -> 8), global average pool, linear head; input float [0, 1]."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stem = conv_bn_relu(3, c1)  # [B, c1, 32, 32]
        self.stage1 = ResidualStage(c1, c1, 1)  # [B, c1, 32, 32]
        self.stage2 = ResidualStage(c1, c2, 2)  # [B, c2, 16, 16]
        self.stage3 = ResidualStage(c2, c3, 2)  # [B, c3, 8, 8]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - 0.5  # centre the [0, 1] input; no dataset statistics needed
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


@register_model("digits-cnn")
def digits_cnn(num_classes: int = 10, **kwargs) -> DigitsCNN:
    """Build the digits demo classifier."""
    return DigitsCNN(num_classes=num_classes, **kwargs)
