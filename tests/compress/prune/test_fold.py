"""Folding act(beta) of removed channels: the pruned model computes what zeroing their gammas predicts."""
import copy

import numpy as np
import torch

from compress.prune import analyze
from compress.prune.core import remove_units
from compress.prune.fold import fold_removed, zero_gammas
from compress.prune.masks import Decider

X = torch.rand(2, 3, 8, 8)


def _plan(model, p=0.5, ignore=()):
    analysis = analyze(model, X, ignore=ignore)
    units = analysis.prunable_units()
    groups = {c.group for u in units for c in u.carriers}
    keeps = Decider(units, floor_min=1).decide_all({g: p for g in groups})
    return analysis, units, keeps


@torch.no_grad()
def _small_gammas(model, share=0.5, seed=0):
    """Sparse-trained look: half of every BN's gammas near zero, betas and statistics non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight[torch.randperm(c, generator=g)[: int(share * c)]] = torch.rand(int(share * c), generator=g) * 1e-3
            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def test_fold_makes_removal_equal_to_zeroed_gammas(nets):
    model = _small_gammas(nets["pointwise"]())
    original = model(X)
    analysis, units, keeps = _plan(model, ignore=["d.*"])  # d has no BN: its channels are not constant
    assert sum(int((~k).sum()) for k in keeps) >= 16, "half of the channels are small and go"
    predicted = copy.deepcopy(model)
    zero_gammas(predicted, units, keeps)
    predicted_out = predicted(X)
    stats = fold_removed(analysis, units, keeps)
    assert stats["folded"] > 0 and stats["not_constant"] == 0, stats
    assert model.d[0].bias is not None, "a conv with neither bias nor BN after it gets a bias"
    remove_units(analysis, units, keeps)
    assert model.a[0].out_channels < 32 and model.b[0].out_channels < 24
    pruned = model(X)
    assert torch.allclose(pruned, predicted_out, atol=1e-5, rtol=1e-5), (pruned - predicted_out).abs().max()
    # the removal changes the output only by what the removed (tiny) gammas contributed
    change, predicted_change = (pruned - original).abs().max(), (predicted_out - original).abs().max()
    assert torch.isclose(change, predicted_change, rtol=1e-3, atol=1e-6), (change, predicted_change)
    assert change < 0.05 * original.abs().max()


def test_without_fold_the_constants_are_lost(nets):
    model = _small_gammas(nets["pointwise"]())
    analysis, units, keeps = _plan(model)
    predicted = copy.deepcopy(model)
    zero_gammas(predicted, units, keeps)
    remove_units(analysis, units, keeps)
    assert (model(X) - predicted(X)).abs().max() > 1e-3, "removing act(beta) without folding changes outputs"


def test_fold_with_padded_convs_is_exact_inside(nets):
    model = _small_gammas(nets["chunk"]())
    analysis, units, keeps = _plan(model)
    predicted = copy.deepcopy(model)
    zero_gammas(predicted, units, keeps)
    fold_removed(analysis, units, keeps)
    remove_units(analysis, units, keeps)
    x = torch.rand(2, 3, 16, 16)
    want, got = predicted(x), model(x)
    # 3x3 convs: the folded bias adds taps that zero padding removed, so only the border may differ
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert torch.allclose(got[inner], want[inner], atol=1e-4), (got - want)[inner].abs().max()
    assert np.isfinite(got.detach().numpy()).all()


@torch.no_grad()
def test_fold_with_batches_replaces_removed_channels_by_their_mean(nets):
    """With calibration batches, removed channels (constant or not) become their mean: a linear reader's output
    keeps its mean over those batches exactly."""
    model = _small_gammas(nets["pointwise"]())
    batches = [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)]
    reader_in = []
    hook = model.fc.register_forward_hook(lambda m, i, o: reader_in.append(o))
    for b in batches:
        model(b)
    want = torch.cat(reader_in).mean(0)
    hook.remove()
    analysis, units, keeps = _plan(model, p=0.5)
    stats = fold_removed(analysis, units, keeps, batches)
    assert stats["folded"] > 0 and stats["not_constant"] == 0, stats
    remove_units(analysis, units, keeps)
    got = torch.cat([model(b) for b in batches]).mean(0)
    assert model.d[0].out_channels < 16
    assert not torch.allclose(got, torch.cat([model(b) for b in batches])[0])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
