"""The uniform magnitude baseline: same share per unit, weakest filters out, targets met, model still runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.prune.baselines import magnitude_importance, uniform_keep, uniform_magnitude_prune
from compress.prune.config import PruneConfig
from compress.prune.core import analyze_scope

from .conftest import ChunkNet, GroupedNet, cbr, randomize_bn


class Chain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 32, 3)
        self.b = cbr(32, 32, 3)
        self.head = torch.nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_importance_ranks_the_weak_filters_last() -> None:
    torch.manual_seed(0)
    model = Chain().eval()
    with torch.no_grad():
        model.a[0].weight[:8] *= 1e-3  # the 8 weakest output filters of `a`
    analysis = analyze_scope(model, torch.randn(1, 3, 16, 16))
    unit = next(u for u in analysis.prunable_units() if any(m.module == "a.0" and m.dim == "out" for m in u.members))
    imp = magnitude_importance(analysis, unit)
    keep = uniform_keep(unit, imp, 0.25, floor=1)
    a_member = next(m for m in unit.members if m.module == "a.0" and m.dim == "out")
    removed = set(a_member.local[~keep[a_member.root]].tolist())
    assert removed == set(range(8))


@pytest.mark.parametrize("net", [Chain, ChunkNet, GroupedNet])
def test_uniform_prune_meets_the_macs_target_and_runs(net) -> None:
    torch.manual_seed(0)
    model = randomize_bn(net()).eval()
    x = torch.randn(2, 3, 16, 16)
    result = uniform_magnitude_prune(model, x, {"macs": 0.3}, log=lambda s: None)
    assert result.figures["macs_ratio"] <= 0.7 + 1e-6
    assert result.figures["macs_ratio"] > 0.3  # bisection: the smallest ratio that meets it, not everything
    assert torch.isfinite(result.model(x)).all()


def test_uniform_method_needs_a_target() -> None:
    with pytest.raises(ValueError, match="uniform"):
        PruneConfig(method="uniform", ratios={"*": 0.5})
    assert PruneConfig(method="uniform", target={"macs": 0.3}).method == "uniform"
