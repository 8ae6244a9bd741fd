"""Calibration views toward the BatchNorm statistics (compress.quant.views) and quantize's bn_views_steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress.quant as cq
from compress.quant.views import batchnorm_layers, batchnorm_statistics_loss, bn_statistic_views, viewable_batches


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # "training" statistics far from what the calibration batches give
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(1.5, 3)
    return net.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) * 0.5 for _ in range(3)]


def _statistics_gap(net: nn.Module, x: torch.Tensor) -> float:
    gaps = []
    hooks = [bn.register_forward_hook(lambda m, i, _o: gaps.append(float(batchnorm_statistics_loss(i[0], m))))
             for bn in batchnorm_layers(net)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return sum(gaps)


def test_views_move_toward_the_running_statistics_and_leave_the_model_alone() -> None:
    net, batches = _net().train(), _batches()  # train mode: the views must not update the running statistics
    before = copy.deepcopy(net.state_dict())
    flags = [p.requires_grad for p in net.parameters()]
    views = bn_statistic_views(net, batches, steps=30, lr=0.1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running statistics included
    assert [p.requires_grad for p in net.parameters()] == flags and net.training
    assert all(not v.requires_grad for v in views)
    assert [v.shape for v in views] == [b.shape for b in batches]
    net.eval()
    for batch, view in zip(batches, views):
        assert _statistics_gap(net, view) < 0.6 * _statistics_gap(net, batch)
        assert not torch.equal(batch, view)


def test_views_only_for_tensor_batches_of_a_model_with_batchnorm() -> None:
    net, batches = _net(), _batches()
    assert bn_statistic_views(net, batches, steps=0) == []
    assert bn_statistic_views(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), batches, steps=3) == []
    ids = [torch.randint(0, 5, (4, 6))]  # token ids: nothing to move
    assert bn_statistic_views(net, ids, steps=3) == []
    mixed = [batches[0], batches[1][:1], [batches[2]]]  # a tensor, a single input, a list (a detector's images)
    assert viewable_batches(net, mixed) == [0]
    seen = []
    assert len(bn_statistic_views(net, mixed, steps=2, advance=seen.append)) == 1 and seen == [0]


def test_views_skip_a_model_whose_forward_reaches_no_batchnorm_and_work_under_inference_mode() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(192, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    seen = []
    assert bn_statistic_views(Unused().eval(), _batches(), steps=3, advance=seen.append) == []
    assert seen == [0, 1, 2]  # every viewable batch is still counted for the progress bar
    net, batches = _net(), _batches()
    with torch.inference_mode():  # a caller in inference mode still gets its views
        views = bn_statistic_views(net, batches, steps=2)
    assert len(views) == 3 and not torch.equal(views[0], batches[0])


def test_quantize_calibrates_on_the_views_too() -> None:
    net, batches = _net(), _batches()
    events = []
    plain = cq.quantize(copy.deepcopy(net), batches, "jlcm", bits=2, allocation="uniform", calib_steps=5)
    viewed = cq.quantize(copy.deepcopy(net), batches, "jlcm", bits=2, allocation="uniform", calib_steps=5,
                         bn_views_steps=5, progress=events.append)
    assert viewed.quantization_plan["summary"]["bn_views"] == len(batches)
    assert "bn_views" not in plain.quantization_plan["summary"]
    assert sum(e["phase"] == "views" for e in events) == len(batches)
    x = batches[0]
    with torch.no_grad():  # the views changed what the fits saw
        assert not torch.equal(plain(x), viewed(x))
    again = cq.quantize(copy.deepcopy(net), batches, "jlcm", bits=2, allocation="uniform", calib_steps=5,
                        bn_views_steps=5)
    with torch.no_grad():  # and deterministically
        assert torch.equal(viewed(x), again(x))


def test_quantize_warns_when_no_view_can_be_made() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))  # no BatchNorm
    with pytest.warns(UserWarning, match="bn_views_steps made no view"):
        model = cq.quantize(net, _batches(), "jlcm", bits=2, allocation="uniform", calib_steps=2, bn_views_steps=3)
    assert model.quantization_plan["summary"]["bn_views"] == 0
