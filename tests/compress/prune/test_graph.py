"""Coupled channels on the graph patterns torch-pruning gets wrong or needs help with."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.prune import PruneConfig, PruneError, analyze, prune_model
from compress.prune.core import masked_copy, compare_outputs, remove_units
from compress.prune.masks import Decider

X = torch.rand(2, 3, 8, 8)


def quiet(_: str) -> None:
    pass


def _prune(model, **cfg):
    cfg.setdefault("floor_min", 1)
    return prune_model(model, PruneConfig(**cfg), X, log=quiet)


def test_chunk_is_one_unit_with_balanced_parts(nets):
    model = nets["randomize_bn"](nets["chunk"]())
    analysis = analyze(model, X)
    stem = [u for u in analysis.units if u.name == "stem.0"]
    assert len(stem) == 1 and stem[0].prunable, [(u.name, u.reason) for u in analysis.units]
    unit = stem[0]
    assert unit.size == 32 and len(unit.balance) == 1 and unit.balance[0].shape == (2, 16)
    assert {c.name for c in unit.carriers} == {"stem.1", "m2.1"}, "the residual partner scores the second half"
    assert [m.module for m in unit.members if m.dim == "in"].count("out.0") == 1
    keep = Decider([unit], floor_min=1).decide_all({g: 0.5 for g in {c.group for c in unit.carriers}})[0]
    assert keep[:16].sum() == keep[16:].sum(), "both halves of the chunk keep the same count"


def test_chunk_net_prunes_exactly(nets):
    model = nets["randomize_bn"](nets["chunk"]())
    model.eval()
    result = _prune(model, ratios={"*": 0.5}, fold=False)
    assert model.stem[0].out_channels % 2 == 0 and model.stem[0].out_channels < 32
    half = model.stem[0].out_channels // 2
    assert model.m1[0].in_channels == half and model.m2[0].out_channels == half
    assert model.out[0].in_channels == 3 * half, "cat(a, b, y) reads three halves"
    assert model(X).shape == (2, 5, 8, 8)
    assert result.figures["params_ratio"] < 0.8


def test_grouped_conv_keeps_positions_per_group(nets):
    model = nets["randomize_bn"](nets["grouped"]())
    analysis = analyze(model, X)
    unit = next(u for u in analysis.units if u.name == "a.0")
    assert unit.ties is not None and len(np.unique(unit.ties)) == 8, "32 channels in 4 groups: 8 tie classes"
    _prune(model, ratios={"*": 0.5})
    conv = model.b[0]
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels < 32 and model(X).shape == (2, 5, 8, 8)


def test_output_layers_and_ignored_layers_keep_their_channels(nets):
    model = nets["randomize_bn"](nets["grouped"]())
    analysis = analyze(model, X, ignore=["c.*"])
    assert analysis.output_layers == ["head"], "the head feeds the output: never a root"
    assert {u.name: u.reason for u in analysis.units}["c.0"] == "layer c.0 is ignored"
    _prune(model, ratios={"*": 0.6}, ignore=["c.*"])
    assert model.c[0].out_channels == 24 and model.head.out_channels == 5


def test_fixed_size_split_is_refused_with_the_reason(nets):
    model = nets["randomize_bn"](nets["fixed_split"]())
    reasons = {u.name: u.reason for u in analyze(model, X).units}
    assert "torch.split into fixed sizes [8, 24]" in reasons["a.0"], reasons
    _prune(model, ratios={"*": 0.5})
    assert model.a[0].out_channels == 32, "the split's producer stays whole"
    assert model.b[0].out_channels < 16 and model(X).shape == (2, 5, 8, 8)


def test_groupnorm_units_stay_whole():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 8, 1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    reasons = {u.name: u.reason for u in analyze(model, X).units}
    assert "GroupNorm 1" in reasons["0"], reasons
    assert reasons["3"] is None


def test_wrong_mapping_is_caught_and_the_layer_named(nets):
    model = nets["randomize_bn"](nets["flip"]())
    with pytest.raises(PruneError, match=r"pruning a\.0 gives a wrong model .* ignore list"):
        _prune(model, ratios={"*": 0.5})
    model = nets["randomize_bn"](nets["flip"]())
    _prune(model, ratios={"*": 0.5}, ignore=["a.*"])
    assert model.a[0].out_channels == 32 and model.b[0].out_channels < 32


def test_channel_shuffle_is_found_by_structure(nets):
    model = nets["randomize_bn"](nets["shuffle"]())
    reasons = {u.name: u.reason for u in analyze(model, X).units}
    assert "regroups the channel axis (a channel shuffle)" in reasons["a.0"], reasons
    _prune(model, ratios={"*": 0.5})
    assert model.a[0].out_channels == 32 and model.b[0].out_channels < 32 and model(X).shape == (2, 5, 8, 8)


def test_unprunable_model_raises_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))  # its only layer is the output
    with pytest.raises(PruneError, match="no prunable channels .*model output"):
        _prune(model, ratios={"*": 0.5})


def test_masked_reference_matches_removal(nets):
    model = nets["randomize_bn"](nets["chunk"]()).eval()
    analysis = analyze(model, X)
    units = analysis.prunable_units()
    keeps = Decider(units, floor_min=1).decide_all({g: 0.5 for u in units for g in [c.group for c in u.carriers]})
    reference = masked_copy(model, list(zip(units, keeps)))
    remove_units(analysis, units, keeps, verify=False)
    assert compare_outputs(reference, model, X) is None


class _ShuffleNetlet(nn.Module):
    """Two ShuffleNet-v2 blocks: chunk, branch (1x1, depthwise 3x3, 1x1), concat, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 3, 1, 1, groups=24),
            nn.BatchNorm2d(24), nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            left, right = x.chunk(2, dim=1)
            x = torch.cat([left, block(right)], dim=1)
            b, c, h, w = x.shape
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.head(x.mean((2, 3)))


def test_channel_shuffle_is_pruned_inside_branches_and_stays_whole_across_the_shuffle():
    torch.manual_seed(0)
    model = _ShuffleNetlet().eval()
    x = torch.rand(2, 3, 32, 32)
    analysis = analyze(model, x)
    whole = [u for u in analysis.units if u.reason and "channel shuffle" in u.reason]
    assert whole, [u.reason for u in analysis.units]
    inner = {(m.module, m.dim) for u in analysis.prunable_units() for m in u.members}
    assert ("blocks.0.0", "out") in inner and ("blocks.1.0", "out") in inner  # the branches' hidden channels
    result = prune_model(model, PruneConfig(target={"params": 0.2}), x, log=lambda _: None)
    assert 0.18 <= 1 - result.figures["params_ratio"] <= 0.22
    assert result.model(x).shape == (2, 5)
