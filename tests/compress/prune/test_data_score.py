"""Data importance: a channel scores the share of its readers' output variance it carries."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.errors import PruneError
from compress.prune import analyze
from compress.prune.config import PruneConfig
from compress.prune.core import prune_model
from compress.prune.data_score import score_from_data

X = torch.rand(4, 3, 8, 8)


class TwoLayer(nn.Module):
    """conv(3 -> 8) + BN + ReLU read by conv(8 -> 4) + BN; a linear head reads the pooled 4 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def _unit(analysis, name):
    return next(u for u in analysis.prunable_units() if any(m.module == name and m.dim == "out" for m in u.members))


@torch.no_grad()
def test_a_channel_its_reader_ignores_scores_zero_and_a_large_one_scores_most():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    model.b[0].weight[:, 2] = 0  # channel 2 of `a` is read by nobody
    model.b[0].weight[:, 5] *= 10  # channel 5 carries most of b's output
    analysis = analyze(model, X)
    gammas = [c.score.copy() for c in _unit(analysis, "a.0").carriers]
    assert score_from_data(analysis, [X, torch.rand(4, 3, 8, 8)]) >= 1
    unit = _unit(analysis, "a.0")
    score = np.zeros(unit.size)
    for c in unit.carriers:
        score[c.roots] = c.score
        assert c.pool == "data" and c.kind == "gamma", "the carrier is still a BN: folding and sparse training see it"
    assert not np.allclose(score, np.concatenate(gammas)[: unit.size])
    assert score[2] == 0 and int(np.argmax(score)) == 5, score
    assert 0 < score.sum() <= 4 + 1e-9, "shares of b's output variance, summed over b's 4 outputs"


def test_prune_model_with_data_importance_meets_the_target_and_needs_batches(nets):
    model = nets["pointwise"]().eval()
    config = PruneConfig(target={"params": 0.3}, importance="data")
    with pytest.raises(PruneError, match="needs calibration batches"):
        prune_model(model, config, X, log=lambda s: None)
    lines = []
    before = sum(p.numel() for p in model.parameters())
    result = prune_model(model, config, X, log=lines.append, batches=[X, torch.rand(4, 3, 8, 8)])
    assert abs(1 - result.figures["params_ratio"] - 0.3) <= 0.02, result.figures
    assert sum(p.numel() for p in model.parameters()) < before
    assert any("data importance on 8 images" in s for s in lines), lines
    assert any("BatchNorm statistics of" in s for s in lines), lines


@torch.no_grad()
def test_data_importance_keeps_a_pretrained_like_model_closer_than_gamma():
    """On a model whose |gamma| does not say how much a channel is used (large gammas on channels the reader barely
    reads), the data score removes the channels that matter least: the pruned output stays closer."""
    torch.manual_seed(1)
    errors = {}
    for importance in ("bn", "data"):
        torch.manual_seed(1)
        model = TwoLayer().eval()
        g = model.a[1].weight
        g.copy_(torch.linspace(0.5, 2.0, 8))
        model.b[0].weight.mul_(torch.linspace(4.0, 0.1, 8)[None, :, None, None])  # large gamma, small use
        x = torch.rand(16, 3, 8, 8)
        want = model(x)
        prune_model(model, PruneConfig(ratios={"*": 0.5}, importance=importance, floor_min=1), x,
                    log=lambda s: None, batches=[x])
        errors[importance] = float((model(x) - want).pow(2).mean())
    assert errors["data"] < 0.5 * errors["bn"], errors
