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
        prune_model(model, PruneConfig(ratios={"*": 0.5}, floor_min=1), X, log=quiet, retries=0)
    model = nets["randomize_bn"](nets["flip"]())
    _prune(model, ratios={"*": 0.5}, ignore=["a.*"])
    assert model.a[0].out_channels == 32 and model.b[0].out_channels < 32


def test_a_unit_whose_removal_breaks_the_model_is_kept_whole_and_the_rest_pruned(nets):
    """By default the culprit is put back and kept whole (with a warning), and the search runs again."""
    model = nets["randomize_bn"](nets["flip"]())
    with torch.no_grad():
        before = model(X)
    lines = []
    prune_model(model, PruneConfig(ratios={"*": 0.5}, floor_min=1), X, log=lines.append)
    assert any("WARNING" in line and "keeping a.0 whole" in line for line in lines), lines
    assert model.a[0].out_channels == 32 and model.b[0].out_channels < 32
    with torch.no_grad():
        assert model(X).shape == before.shape


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


class _GhostNet(nn.Module):
    """GhostNet's module: a conv, a depthwise "cheap" conv on its output, both concatenated; then a conv."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(8, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c))
        self.out = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(self.stem(x))
        return self.out(self.dw(torch.cat([y, self.cheap(y)], dim=1))).mean((2, 3))


def test_elements_sharing_a_channel_are_tied_so_the_floor_holds():
    """Root j and root j + c reach the same channel j of `primary` (through the depthwise cheap conv): torch-pruning
    removes both when either goes. The unit ties them, so the decider never plans to empty `primary` (ghostnet_050
    failed with "would empty a layer") and the planned count is the removed one (ghostnetv2 overshot the target)."""
    torch.manual_seed(0)
    model = _GhostNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)
    analysis = analyze(model, X)
    unit = next(u for u in analysis.units if u.name in ("dw.0", "primary.0", "cheap.0") and u.size == 16)
    assert unit.prunable and unit.ties is not None
    assert all(unit.ties[j] == unit.ties[j + 8] for j in range(8)), unit.ties
    decider = Decider([unit], floor_min=1)
    keep = decider.decide_all({g: 0.97 for g in decider.groups})[0]
    assert keep.sum() >= 2 and all(keep[j] == keep[j + 8] for j in range(8))
    result = _prune(model, ratios={"*": 0.5})
    assert 0 < model.primary[0].out_channels < 8 and model.dw[0].out_channels == 2 * model.primary[0].out_channels
    assert model(X).shape == (2, 4) and result.figures["channels_removed"] > 0


class _StdConv(nn.Conv2d):
    """timm ScaledStdConv2d: each output row of the weight standardized over its inputs, times a per-output
    `gain` parameter torch-pruning does not know (it prunes weight and bias only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-5)
        return self._conv_forward(x, w.reshape_as(self.weight), self.bias)


def test_per_channel_parameters_of_conv_subclasses_are_cut_with_the_channels():
    """nfnet_l0 failed with "weight should contain 29 elements not 32": the gain of its ScaledStdConv2d layers
    kept every channel. The gain is cut with the layer's output channels, and units that cut the inputs of such a
    layer (whose forward transforms its weight) are checked by shape, not against the masked copy."""
    torch.manual_seed(0)
    model = nn.Sequential(_StdConv(3, 16, 3, padding=1), nn.SiLU(), _StdConv(16, 16, 3, padding=1), nn.SiLU(),
                          _StdConv(16, 24, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    result = _prune(model, target={"params": 0.3})
    assert 0.6 <= result.figures["params_ratio"] <= 0.75, result.figures
    for layer in model:
        if isinstance(layer, _StdConv):
            assert layer.gain.shape[0] == layer.out_channels
    assert model[2].out_channels < 16 or model[4].out_channels < 24
    assert model(X).shape == (2, 5)


def test_a_missed_target_is_logged_with_what_held_the_channels(nets):
    """skresnet18 reached 0.014 of a 0.3 target and nothing said why: the prune log now says which share of the
    channels is kept whole and for which reasons."""
    model = nets["randomize_bn"](nets["fixed_split"]())
    lines: list[str] = []
    prune_model(model, PruneConfig(target={"params": 0.9}, floor_min=1), X, log=lines.append)
    warning = [line for line in lines if line.startswith("prune: WARNING target missed")]
    assert len(warning) == 1 and "kept whole:" in warning[0] and "torch.split into fixed sizes" in warning[0], lines
    lines.clear()
    prune_model(nets["randomize_bn"](nets["chunk"]()), PruneConfig(target={"params": 0.3}, floor_min=1), X,
                log=lines.append)
    assert not [line for line in lines if "target missed" in line], lines


def test_a_group_torch_pruning_cannot_walk_is_kept_whole(nets, monkeypatch):
    """lambda_resnet26t failed the whole shrink with a ZeroDivisionError inside torch-pruning's index mapping
    while building one layer's group: that layer now keeps its channels, with the reason, and the rest is pruned."""
    import compress.prune.graph as graph_module

    real = graph_module._full_group

    def failing(graph, module, bounds):
        if graph._module2name[module] == "a.0":
            raise ZeroDivisionError("integer division or modulo by zero")
        return real(graph, module, bounds)

    monkeypatch.setattr(graph_module, "_full_group", failing)
    model = nets["randomize_bn"](nets["fixed_split"]())
    reasons = {u.name: u.reason for u in analyze(model, X).units}
    assert "torch-pruning cannot walk the channels of a.0 (ZeroDivisionError" in reasons["a.0"], reasons
    _prune(model, ratios={"*": 0.5})
    assert model.a[0].out_channels == 32 and model.b[0].out_channels < 16


def test_a_group_walk_that_cycles_through_a_reshape_is_cut_short():
    """torchvision's Swin: torch-pruning's flatten mappings around the relative-position bias cycle and multiply
    the index set at each pass; the walk stops with a reason (the stream is kept whole), the rest is pruned."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    analysis = analyze(model, x)
    reasons = [u.reason for u in analysis.units if u.reason]
    assert any("cycles through a reshape" in r for r in reasons), reasons
    assert any(u.reason is None for u in analysis.units), "the MLP hidden channels stay prunable"
    before = model(x)
    result = prune_model(model, PruneConfig(target={"params": 0.3}), x, log=lambda _: None)
    assert abs(result.figures["params_ratio"] - 0.7) <= 0.02, result.figures
    assert model(x).shape == before.shape


def test_a_group_walk_past_its_entry_budget_stops():
    """The entry budget of a walk (split / concat offsets cycling, timm's CoaT) raises GroupWalkError."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    from compress.prune.graph import GroupWalkError, _bounded_walk

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 9, 9))
    walk = lambda: graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [0, 1])  # noqa: E731
    with _bounded_walk(10**9, 100):
        assert len(walk()) >= 3
    with _bounded_walk(10**9, 2), pytest.raises(GroupWalkError, match="over 2 entries"):
        walk()
    with _bounded_walk(3, 100), pytest.raises(GroupWalkError, match="cycles through a reshape"):
        _FlattenIndexMapping(stride=4)([tp._helpers._HybridIndex(idx=0, root_idx=0)])
