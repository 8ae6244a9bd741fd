"""The pooled-map prior of underdetermined classifiers (compress.quant.pooled)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress.quant as cq
from compress.quant.capture import collect_stats
from compress.quant.pooled import is_spatial_mean, within_map_moment
from compress.quant.sites import call_order, find_sites
from compress.quant.stats import LayerStats, quadratic_loss


class PooledNet(nn.Module):
    """conv features -> global average pool -> linear head (16 inputs), and a second head on the flat map."""

    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
        self.fc = nn.Linear(16 * 36 if flat else 16, 5)
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return self.fc(maps.flatten(1) if self.flat else F.adaptive_avg_pool2d(maps, 1).flatten(1))


def _stats(net: nn.Module, xs: list[torch.Tensor], pooled: dict[str, float] | None) -> LayerStats:
    ordered, counts = call_order(net, find_sites(net), xs[0])
    return collect_stats(net, None, [s for s in ordered if s.name == "fc"], xs, counts, 8192, pooled=pooled)["fc"]


def test_within_map_moment_and_spatial_mean() -> None:
    maps = torch.randn(2, 4, 3, 3)
    rows = maps.flatten(2) - maps.flatten(2).mean(2, keepdim=True)
    expected = sum(rows[b] @ rows[b].t() for b in range(2))
    assert torch.allclose(within_map_moment(maps).float(), expected, atol=1e-5)
    assert within_map_moment(torch.ones(2, 4, 3, 3)).abs().max() < 1e-6  # no spread within an image: no prior
    assert is_spatial_mean(maps, maps.mean((2, 3)))
    assert not is_spatial_mean(maps, maps.amax((2, 3)))
    assert not is_spatial_mean(maps, maps.mean((2, 3))[:, :3])


def test_a_head_after_global_pooling_gets_the_map_moment_scaled_to_its_trace() -> None:
    torch.manual_seed(0)
    net = PooledNet().eval()
    xs = [torch.rand(3, 3, 8, 8) for _ in range(2)]
    plain, with_prior = _stats(net, xs, None), _stats(net, xs, {"fc": 0.5})
    maps = torch.cat([net.features(x) for x in xs])
    moment = (within_map_moment(maps) / (maps.shape[0] * 36)).float()
    added = with_prior.H[0] - plain.H[0]
    assert float(added.diagonal().mean() / plain.H[0].diagonal().mean()) == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(added / added.diagonal().mean(), moment / moment.diagonal().mean(), atol=1e-5)
    # the loss of any weight gains exactly the prior's quadratic form (a ridge toward the float weights)
    w = net.fc.weight.detach()
    wq = w + 0.1 * torch.randn_like(w)
    gain = quadratic_loss(wq, w, with_prior) * with_prior.output_energy(w) - quadratic_loss(wq, w, plain) * plain.output_energy(w)
    assert float(gain) == pytest.approx(float(((wq - w) @ added * (wq - w)).sum()), rel=1e-3)


def test_a_head_not_fed_a_spatial_mean_gets_no_prior() -> None:
    torch.manual_seed(0)
    net = PooledNet(flat=True).eval()
    xs = [torch.rand(3, 3, 8, 8) for _ in range(2)]
    assert torch.equal(_stats(net, xs, None).H, _stats(net, xs, {"fc": 1.0}).H)


def test_quantize_applies_the_prior_to_underdetermined_heads_only() -> None:
    torch.manual_seed(0)
    net = PooledNet().eval()
    few = [torch.rand(3, 3, 8, 8) for _ in range(2)]  # 6 rows for 16 inputs: underdetermined
    many = [torch.rand(12, 3, 8, 8) for _ in range(2)]  # 24 rows: not

    def head_error(batches: list[torch.Tensor], prior: float) -> float:
        q = cq.quantize(copy.deepcopy(net), batches, method="jlcm", bits=2, allocation="uniform", calib_steps=5,
                        pooled_prior=prior)
        return next(e["error"] for e in q.quantization_plan["layers"] if e["name"] == "fc")

    assert head_error(few, 1.0) != head_error(few, 0.0)
    assert head_error(many, 1.0) == head_error(many, 0.0)
