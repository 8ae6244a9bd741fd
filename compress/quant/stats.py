"""Second-moment statistics of a layer's inputs: all that output-reconstruction quantization needs.

For a layer y_r = w_r . x (conv: x = one input patch, unfolded), the calibration loss of a quantized weight
W^ against the float layer is

    L(W^) = sum_r E[(w^_r . x_q - w_r . x_f)^2]
          = sum_r  w^_r H w^_r  - 2 w^_r M w_r  +  w_r F w_r,

with x_q the layer's input in the quantized-so-far model, x_f its input in the float model (the targets),
H = E[x_q x_q^T], M = E[x_q x_f^T] and F = E[x_f x_f^T]. Accumulating these [C, C] moments over every
calibration batch gives the exact loss over all of them with memory independent of the number of samples.
Rows see different inputs in grouped convs (conv group j: rows j*R/g ..) and in attention in-projections
(query, key, value rows), so each moment is [g, C, C], one block per input group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerStats", "quadratic_loss"]


@dataclass
class LayerStats:
    """Input moments of one layer: H is [g, C, C] (g input groups); `samples` rows were seen.

    The cross terms come in one of two forms. Built for a known weight W [R, C] (`zeros(..., weight=W)`, what
    calibration does), only what the loss reads is kept: P [R, C] (row r: E[(w_r . x_f) x_q], = M w_r) and the
    energy E = sum_r E[(w_r . x_f)^2] (= sum_r w_r F w_r), at 2 n R C multiply-adds per batch of n rows instead of
    the 2 n C^2 of M and F (2.5x less for a 3x3 conv of 512 channels, more for wide inputs). Without a weight,
    M and F [g, C, C] themselves (any weight can then be scored)."""

    H: torch.Tensor
    M: torch.Tensor | None
    F: torch.Tensor | None
    samples: int
    weight: torch.Tensor | None = None  # [R, C] float32: the weight P and energy are for
    P: torch.Tensor | None = None
    energy: torch.Tensor | None = None  # 0-d

    @classmethod
    def zeros(cls, groups: int, cols: int, device: torch.device | str = "cpu",
              weight: torch.Tensor | None = None) -> LayerStats:
        """Empty moments; with `weight`, in the P / energy form when that is cheaper (fewer rows than columns per
        input group: 2 n R C < 2 n C^2 multiply-adds), else M and F."""
        z = lambda: torch.zeros(groups, cols, cols, device=device, dtype=torch.float64)  # noqa: E731
        if weight is None or weight.shape[0] >= weight[0].numel() * groups:
            return cls(z(), z(), z(), 0)
        w = weight.detach().float().reshape(weight.shape[0], -1).to(device)
        return cls(z(), None, None, 0, w, torch.zeros(w.shape, device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.float64))

    def add(self, xq: torch.Tensor, xf: torch.Tensor | None = None) -> None:
        """Accumulate inputs xq, xf: [g, n, C] (the same n samples seen by both models; xf None: xq)."""
        xq = xq.float()
        hq = torch.bmm(xq.transpose(1, 2), xq).double()  # products in float32, sums in float64
        self.H += hq
        if self.weight is not None:
            g, rows = xq.shape[0], self.weight.shape[0]  # g: 1 when every row reads the same input
            x_f = xq if xf is None else xf.float()
            y_f = torch.bmm(x_f, self.weight.reshape(g, rows // g, -1).transpose(1, 2))  # [g, n, R/g]
            self.P += torch.bmm(y_f.transpose(1, 2), xq).reshape(rows, -1).double()
            self.energy += y_f.double().pow(2).sum()
        elif xf is None:
            self.M += hq
            self.F += hq
        else:
            xf = xf.float()
            self.M += torch.bmm(xq.transpose(1, 2), xf).double()
            self.F += torch.bmm(xf.transpose(1, 2), xf).double()
        self.samples += xq.shape[1]

    def finalize(self) -> LayerStats:
        """Means (float32) instead of sums."""
        n = max(self.samples, 1)
        mean = lambda t: None if t is None else (t / n).float()  # noqa: E731
        return LayerStats(mean(self.H), mean(self.M), mean(self.F), self.samples, self.weight, mean(self.P),
                          mean(self.energy))

    def target(self, w: torch.Tensor) -> torch.Tensor:
        """P [R, C] for the weight w [R, C] (row r: M w_r; the kept P when these moments were built for w)."""
        if self.P is not None:
            return self.P
        g, rows = self.H.shape[0], w.shape[0]
        return torch.bmm(w.reshape(g, rows // g, -1), self.M.transpose(1, 2)).reshape(w.shape)

    def output_energy(self, w: torch.Tensor) -> torch.Tensor:
        """sum_r w_r F w_r (0-d) for the weight w [R, C] (the kept energy when built for w)."""
        if self.energy is not None:
            return self.energy
        g, rows = self.H.shape[0], w.shape[0]
        w_g = w.reshape(g, rows // g, -1)
        return (w_g * torch.bmm(w_g, self.F)).sum()

    def damped(self, fraction: float) -> LayerStats:
        """Moments plus lambda*I (lambda = fraction of the mean of diag H): the loss gains lambda ||w^ - w||^2,
        a ridge toward the float weights where the calibration inputs leave directions unconstrained."""
        if fraction <= 0:
            return self
        diag = torch.diagonal(self.H, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # [g]
        eye = torch.eye(self.H.shape[1], dtype=self.H.dtype, device=self.H.device)[None] * (fraction * diag)[:, None, None]
        if self.weight is None:
            return LayerStats(self.H + eye, self.M + eye, self.F + eye, self.samples)
        g, rows = self.H.shape[0], self.weight.shape[0]
        lam = (fraction * diag).repeat_interleave(rows // g)[:, None]  # [R, 1]: each row's group's lambda
        return LayerStats(self.H + eye, None, None, self.samples, self.weight, self.P + lam * self.weight,
                          self.energy + (lam * self.weight.pow(2)).sum())

    def with_prior(self, prior: torch.Tensor, strength: float) -> LayerStats:
        """Moments plus a prior second moment S [C, C] (one input group) scaled to strength x the trace of H: the
        loss gains sum_r (w^_r - w_r) S' (w^_r - w_r), a ridge toward the float weights shaped like S."""
        if strength <= 0:
            return self
        scale = strength * torch.diagonal(self.H, dim1=1, dim2=2).mean() / torch.diagonal(prior).mean().clamp_min(1e-30)
        add = (scale * prior.to(self.H))[None].expand_as(self.H)
        if self.weight is None:
            return LayerStats(self.H + add, self.M + add, self.F + add, self.samples)
        extra = self.weight @ add[0]
        return LayerStats(self.H + add, None, None, self.samples, self.weight, self.P + extra,
                          self.energy + (self.weight * extra).sum())

    def scaled_columns(self, scale: torch.Tensor) -> LayerStats:
        """The moments of the inputs x / scale ([C], > 0), for the weight W * scale: every loss is unchanged for a
        weight W^ scored here as W^ / scale there (activation-aware column scales, compress.quant.jlcm)."""
        inv = 1.0 / scale.to(self.H)
        both = inv[None, :, None] * inv[None, None, :]
        times = lambda t: None if t is None else t * both  # noqa: E731
        weight = None if self.weight is None else self.weight * scale.to(self.weight)[None, :]
        target = None if self.P is None else self.P * inv[None, :]
        return LayerStats(self.H * both, times(self.M), times(self.F), self.samples, weight, target, self.energy)

    def expand(self, groups: int) -> LayerStats:
        """The same moments for `groups` input groups (e.g. one input feeding query, key and value rows)."""
        if self.H.shape[0] == groups:
            return self
        grow = lambda t: None if t is None else t.expand(groups, -1, -1)  # noqa: E731
        return LayerStats(grow(self.H), grow(self.M), grow(self.F), self.samples, self.weight, self.P, self.energy)


def quadratic_loss(wq: torch.Tensor, w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """Relative output error L(W^) / sum_r w_r F w_r of quantized rows wq [R, C] against w [R, C]."""
    g = stats.H.shape[0]
    rows, cols = w.shape
    wq_g = wq.reshape(g, rows // g, cols)
    energy = stats.output_energy(w)
    loss = (wq_g * torch.bmm(wq_g, stats.H)).sum() - 2 * (wq * stats.target(w)).sum() + energy
    return loss / energy.clamp_min(1e-30)
