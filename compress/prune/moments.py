"""Per-channel mean and variance of activations, accumulated over calibration batches (float64 sums)."""
from __future__ import annotations

import torch


class ChannelMoments:
    """Running sums of x and x^2 per channel over every other position (channel axis 1, or -1 for linear)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, t: torch.Tensor, channel_axis: int) -> None:
        t = t.detach().double().movedim(channel_axis, -1).reshape(-1, t.shape[channel_axis])
        s1, s2 = t.sum(0), (t * t).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += t.shape[0]

    def mean(self) -> torch.Tensor:
        return self.s1 / max(self.n, 1)

    def var(self) -> torch.Tensor:
        return (self.s2 / max(self.n, 1) - self.mean() ** 2).clamp_min(0)
