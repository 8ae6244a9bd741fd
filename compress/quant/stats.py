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
    """Input moments of one layer: H, M, F are [g, C, C] (g input groups); `samples` rows were seen."""

    H: torch.Tensor
    M: torch.Tensor
    F: torch.Tensor
    samples: int

    @classmethod
    def zeros(cls, groups: int, cols: int, device: torch.device | str = "cpu") -> LayerStats:
        z = lambda: torch.zeros(groups, cols, cols, device=device, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), 0)

    def add(self, xq: torch.Tensor, xf: torch.Tensor | None = None) -> None:
        """Accumulate inputs xq, xf: [g, n, C] (the same n samples seen by both models; xf None: xq)."""
        xq = xq.float()
        hq = torch.bmm(xq.transpose(1, 2), xq).double()  # products in float32, sums in float64
        self.H += hq
        if xf is None:
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
        return LayerStats((self.H / n).float(), (self.M / n).float(), (self.F / n).float(), self.samples)

    def damped(self, fraction: float) -> LayerStats:
        """Moments plus lambda*I (lambda = fraction of the mean of diag H): the loss gains lambda ||w^ - w||^2,
        a ridge toward the float weights where the calibration inputs leave directions unconstrained."""
        if fraction <= 0:
            return self
        diag = torch.diagonal(self.H, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # [g]
        eye = torch.eye(self.H.shape[1], dtype=self.H.dtype, device=self.H.device)[None] * (fraction * diag)[:, None, None]
        return LayerStats(self.H + eye, self.M + eye, self.F + eye, self.samples)

    def expand(self, groups: int) -> LayerStats:
        """The same moments for `groups` input groups (e.g. one input feeding query, key and value rows)."""
        if self.H.shape[0] == groups:
            return self
        return LayerStats(*(t.expand(groups, -1, -1) for t in (self.H, self.M, self.F)), samples=self.samples)


def quadratic_loss(wq: torch.Tensor, w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """Relative output error L(W^) / sum_r w_r F w_r of quantized rows wq [R, C] against w [R, C]."""
    g = stats.H.shape[0]
    rows, cols = w.shape
    wq_g, w_g = wq.reshape(g, rows // g, cols), w.reshape(g, rows // g, cols)
    energy = (w_g * torch.bmm(w_g, stats.F)).sum()
    loss = (wq_g * torch.bmm(wq_g, stats.H)).sum() - 2 * (wq_g * torch.bmm(w_g, stats.M.transpose(1, 2))).sum() + energy
    return loss / energy.clamp_min(1e-30)
