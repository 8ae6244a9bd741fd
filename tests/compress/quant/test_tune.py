"""End-to-end codebook tuning (compress.quant.tune): codebooks and per-channel parameters move, the mapping does not."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress.quant as cq
from compress.format.layers import QuantizedWeight, quantized_modules
from compress.quant.fold import is_plain_bias
from compress.quant.tune import output_loss, tune_codebooks


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
        net[-1].weight.mul_(20)  # confident logits: a KL that quantization visibly moves
    return net.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def _quantized(net: nn.Module, batches: list[torch.Tensor], column_scale: float = 0.0) -> nn.Module:
    return cq.quantize(copy.deepcopy(net), batches, "jlcm", bits=1, allocation="uniform", calib_steps=5,
                       column_scale=column_scale, column_scale_layers="all")


def _loss(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(output_loss([model(b)], [reference(b)])) for b in batches) / len(batches)


@pytest.mark.parametrize("column_scale", [0.0, 0.5])
def test_tuning_lowers_the_calibration_loss_and_keeps_the_mapping(column_scale: float) -> None:
    net, batches = _net(), _batches()
    model = _quantized(net, batches, column_scale)
    assert all(bool(m.quant_layout.get("column_scale")) == (column_scale > 0) for m in quantized_modules(model).values())
    before = {n: {k: v.clone() for k, v in m.quant_buffers().items()} for n, m in quantized_modules(model).items()}
    result = tune_codebooks(net, model, batches, steps=40, lr=1e-2)
    assert result["kept"] and result["loss_after"] < result["loss_before"]
    assert abs(_loss(model, net, batches) - result["loss_after"]) < 1e-6  # what is stored is what was scored
    layers = quantized_modules(model)
    assert set(layers) == set(before) and all(isinstance(m, QuantizedWeight) for m in layers.values())
    for name, module in layers.items():
        now = module.quant_buffers()
        assert now["codebook"].dtype == torch.float16
        assert not torch.equal(now["codebook"], before[name]["codebook"]), name  # every layer's codebook learned
        for key in now:
            if key != "codebook":
                assert torch.equal(now[key], before[name][key]), (name, key)  # mapping and row map untouched
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


def test_tuning_that_does_not_help_is_rolled_back() -> None:
    net, batches = _net(), _batches()
    model = _quantized(net, batches)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune_codebooks(net, model, batches, steps=10, lr=1e3)  # steps far too large: the loss rises
    assert not result["kept"] and result["loss_after"] > result["loss_before"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_quantize_option_tune_steps_records_the_tuning() -> None:
    net, batches = _net(), _batches()
    model = cq.quantize(copy.deepcopy(net), batches, "jlcm", bits=1, allocation="uniform", calib_steps=5,
                        tune_steps=60, tune_lr=3e-3)
    tuning = model.quantization_plan["summary"]["tuning"]
    assert tuning["steps"] == 60 and tuning["codebooks"] == 3 and tuning["kept"]
    plain = _quantized(net, batches)
    assert _loss(model, net, batches) < _loss(plain, net, batches)
    # BNs folded into their convs (fold_bn) were tuned as shifts only, so export can still fold them
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(is_plain_bias(m) for m in norms)
    assert any(not torch.equal(a.bias, b.bias) for a, b in zip(norms, [m for m in plain.modules()
                                                                     if isinstance(m, nn.BatchNorm2d)]))
    assert _quantized(net, batches).quantization_plan["summary"]["tuning"] is None


def test_the_trainable_decoder_gives_the_stored_weight() -> None:
    from compress.format.weights import decode
    from compress.quant.tune import _CodebookWeight

    net, batches = _net(), _batches()
    for column_scale in (0.0, 0.5):
        for module in quantized_modules(_quantized(net, batches, column_scale)).values():
            buffers = module.quant_buffers()
            got = _CodebookWeight(module.quant_layout, buffers)(None)
            assert torch.allclose(got, decode(module.quant_layout, buffers), rtol=1e-6, atol=1e-7)
