"""1-D k-means for codebook initialisation: exact dynamic programme, then Lloyd refinement.

In one dimension the optimal clusters are contiguous runs of the sorted values, so the weighted k-means
optimum is found exactly by a dynamic programme over the sorted points (Wang & Song, Ckmeans.1d.dp). Large
inputs are first summarised by `max_points` equal-count chunks of the sorted values (each chunk = one
weighted point at its mean); a few weighted Lloyd steps on the raw values then remove the small error the
summary adds. Inputs of at most `max_points` values are solved exactly.
"""
from __future__ import annotations

import torch

__all__ = ["kmeans_1d", "kmeans_1d_widths", "assign_nearest", "kmeans_sse"]


def assign_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `codebook` [K] for every value of `x` (any shape), int64."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


def kmeans_sse(x: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Weighted sum of squared distances of `x` [n] to their nearest entry of the sorted `codebook`."""
    err = (x - codebook[assign_nearest(x, codebook)]) ** 2
    return float((err if weights is None else err * weights).sum())


def _summarise(x: torch.Tensor, w: torch.Tensor, max_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted weighted points [M] (M <= max_points) standing for the sorted values `x` with weights `w`."""
    n = x.numel()
    if n <= max_points:
        return x, w
    chunk = torch.div(torch.arange(n, device=x.device) * max_points, n, rounding_mode="floor")
    ws = torch.zeros(max_points, dtype=x.dtype, device=x.device).index_add_(0, chunk, w)
    wx = torch.zeros(max_points, dtype=x.dtype, device=x.device).index_add_(0, chunk, w * x)
    return wx / ws.clamp_min(1e-300), ws


class _DPTable:
    """Optimal splits of the sorted weighted points p [M] into contiguous segments, by dynamic programme. The
    layer for m segments does not depend on how many are asked for in the end, so one table up to the largest k
    serves every smaller k (the same arithmetic, the same splits)."""

    def __init__(self, p: torch.Tensor, w: torch.Tensor) -> None:
        m = p.numel()
        zero = torch.zeros(1, dtype=p.dtype, device=p.device)
        s0 = torch.cat([zero, torch.cumsum(w, 0)])
        s1 = torch.cat([zero, torch.cumsum(w * p, 0)])
        s2 = torch.cat([zero, torch.cumsum(w * p * p, 0)])
        i = torch.arange(m, device=p.device)
        # cost[i, j]: weighted SSE of segment p[i..j] around its mean (inf where i > j)
        sw = s0[1:][None, :] - s0[:-1][:, None]
        sx = s1[1:][None, :] - s1[:-1][:, None]
        sxx = s2[1:][None, :] - s2[:-1][:, None]
        cost = (sxx - sx * sx / sw.clamp_min(1e-300)).clamp_min(0)
        self.cost = cost.masked_fill(i[:, None] > i[None, :], float("inf"))
        self.best = self.cost[0].clone()  # D_1[j]: one segment p[0..j]
        self.inf = torch.full((1,), float("inf"), dtype=p.dtype, device=p.device)
        self.starts: list[torch.Tensor] = []
        self.back: list[list[int]] = []
        self.m, self.device = m, p.device

    def segments(self, k: int) -> torch.Tensor:
        """The k start indices of the optimal split into k segments."""
        while len(self.starts) < k - 1:
            prev = torch.cat([self.inf, self.best[:-1]])  # prev[i] = D_{m-1}[i - 1]: segments before start i
            total = prev[:, None] + self.cost
            self.best, arg = total.min(dim=0)
            self.starts.append(arg)
        if len(self.back) < k - 1:  # one read back to the host, not one per segment
            self.back += torch.stack(self.starts[len(self.back):]).tolist()
        bounds, j = [], self.m - 1
        for arg in reversed(self.back[:k - 1]):
            s = int(arg[j])
            bounds.append(s)
            j = s - 1
        bounds.append(0)
        return torch.tensor(bounds[::-1], device=self.device)


def _fill(values: torch.Tensor, k: int) -> torch.Tensor:
    """Extend fewer than k distinct sorted values to k distinct ones by splitting the widest gaps."""
    values = torch.unique(values)
    if values.numel() == 0:
        values = torch.zeros(1, dtype=torch.float64, device=values.device)
    while values.numel() < k:
        if values.numel() == 1:
            step = max(abs(float(values[0])), 1e-3) * 0.5
            values = torch.cat([values - step, values, values + step])[: k]
            values = torch.unique(values)
            continue
        gaps = values[1:] - values[:-1]
        g = int(torch.argmax(gaps))
        values = torch.sort(torch.cat([values, ((values[g] + values[g + 1]) / 2).reshape(1)])).values
    return values


def kmeans_1d(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, max_points: int = 256,
              lloyd_steps: int = 8) -> torch.Tensor:
    """Weighted 1-D k-means of the values `x` (any shape): the k sorted centroids, float32 on x's device.

    Exact (global optimum of the weighted SSE) when `x` has at most `max_points` values; otherwise the exact
    optimum of an equal-count summary refined by `lloyd_steps` weighted Lloyd steps. Fewer than k distinct
    values give k distinct centroids anyway (gaps are split), so a sorted codebook never repeats an entry.
    """
    return kmeans_1d_widths(x, [k], weights, max_points, lloyd_steps)[k]


def kmeans_1d_widths(x: torch.Tensor, ks: list[int], weights: torch.Tensor | None = None, max_points: int = 256,
                     lloyd_steps: int = 8) -> dict[int, torch.Tensor]:
    """`kmeans_1d` of the same values for several k at once ({k: centroids}, each exactly what `kmeans_1d`
    gives): the values are sorted and summarised once, and one dynamic programme serves every k."""
    device = x.device
    x = x.detach().reshape(-1).float()
    w = torch.ones_like(x) if weights is None else weights.detach().reshape(-1).float()
    if w.shape != x.shape:
        raise ValueError(f"weights {tuple(w.shape)} must match the values {tuple(x.shape)}")
    w = w.clamp_min(0) + 1e-12 * float(w.abs().mean().clamp_min(1e-30))
    x, order = torch.sort(x)
    w = w[order]
    distinct = 1 + int((x[1:] != x[:-1]).sum())
    out: dict[int, torch.Tensor] = {}
    table, prefix = None, None  # built on the first k that needs them
    xd, wd = x.double(), w.double()
    for k in sorted(set(ks)):
        if distinct <= k:
            out[k] = _fill(xd, k).float().to(device)
            continue
        if table is None:
            p, pw = _summarise(xd, wd, max_points)
            table = _DPTable(p, pw)
        starts = table.segments(k)
        seg = torch.bucketize(torch.arange(p.numel(), device=p.device), starts, right=True) - 1
        zeros = torch.zeros(k, dtype=torch.float64, device=x.device)
        cent = zeros.clone().index_add_(0, seg, pw * p) / zeros.clone().index_add_(0, seg, pw)
        if p.numel() < x.numel():
            # Lloyd on the sorted values: clusters are runs cut at the midpoints, sums come from prefix sums
            if prefix is None:
                zero = torch.zeros(1, dtype=torch.float64, device=x.device)
                prefix = (torch.cat([zero, torch.cumsum(wd, 0)]), torch.cat([zero, torch.cumsum(wd * xd, 0)]),
                          torch.tensor([x.numel()], device=x.device))
            s0, s1, last = prefix
            for _ in range(lloyd_steps):
                cuts = torch.searchsorted(xd, (cent[1:] + cent[:-1]) / 2)
                bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), cuts, last])
                ws = s0[bounds[1:]] - s0[bounds[:-1]]
                new = torch.where(ws > 0, (s1[bounds[1:]] - s1[bounds[:-1]]) / ws.clamp_min(1e-300), cent)
                new = torch.sort(new).values
                if torch.equal(new, cent):
                    break
                cent = new
        if torch.unique(cent).numel() < k:
            cent = _fill(cent, k)
        out[k] = cent.float().to(device)
    return out
