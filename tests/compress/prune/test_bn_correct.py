"""BatchNorm statistics carried across pruning: shifted by what the removed channels carried, not re-estimated."""
import torch
import torch.nn as nn

from compress.prune.bn_correct import bn_input_moments, correct_bn


@torch.no_grad()
def test_correct_bn_shifts_mean_and_scales_variance_by_the_measured_change():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([4.0, 4.0, 4.0]))
    model = nn.Sequential(bn)
    before = {"0": (torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))}
    after = {"0": (torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))}
    assert correct_bn(model, before, after) == 1
    assert torch.allclose(bn.running_mean, torch.tensor([1.5, 1.0, 3.0]))
    assert torch.allclose(bn.running_var, torch.tensor([2.0, 4.0, 4.0])), "a channel with no variance before keeps its own"


@torch.no_grad()
def test_bn_input_moments_are_the_per_channel_mean_and_variance_of_the_input():
    conv = nn.Conv2d(2, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3)).eval()
    x = [torch.randn(4, 2, 5, 5), torch.randn(2, 2, 5, 5)]
    moments = bn_input_moments(model, x)
    y = conv(torch.cat(x)).transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(moments["1"][0], y.mean(1), atol=1e-6)
    assert torch.allclose(moments["1"][1], y.var(1, unbiased=False), atol=1e-6)
    assert not model.training
