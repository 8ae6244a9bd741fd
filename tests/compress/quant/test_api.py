import copy

import pytest
import torch
import torch.nn as nn

import compress.quant as cq
from compress.errors import UserError
from compress.evaluate.size import count_params, storage_bytes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


class TinyMobile(nn.Module):
    """Stem, a depthwise 3x3, a pointwise 1x1, a grouped 3x3 and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU())
        self.grouped = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.pw(self.dw(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class TinyDetector(TinyMobile):
    """Tensor protocol of our detectors: a list of raw maps, one per level."""

    def __init__(self) -> None:
        super().__init__()
        self.p3 = nn.Conv2d(16, 14, 1)
        self.p4 = nn.Conv2d(32, 14, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f3 = self.dw(self.stem(x))
        return [self.p3(f3), self.p4(self.grouped(self.pw(f3)))]


def _images(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 3, 12, 12, generator=gen) for _ in range(n)]


def test_cnn_with_depthwise_and_grouped_convs() -> None:
    torch.manual_seed(0)
    model = TinyMobile().eval()
    ref = copy.deepcopy(model)
    batches = _images()
    dense_bytes = storage_bytes(model)
    cq.quantize(model, batches, method="jlcm", bits=3, allocation="uniform", calib_steps=30, groups=4)
    plan = model.quantization_plan
    assert [e["name"] for e in plan["layers"]] == ["stem.0", "dw.0", "pw.0", "grouped", "head"], "forward order"
    assert all(e["bits"] == 3 and e["error"] is not None for e in plan["layers"])
    assert isinstance(model.dw[0], cq.QuantConv2d) and model.dw[0].groups == 16
    x = _images(1, seed=9)[0]
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 0.05
    assert storage_bytes(model) < dense_bytes / 3 and count_params(model) == count_params(ref)
    assert plan["summary"]["bits_per_weight"] == pytest.approx(
        sum(cq.storage_bits(e["layout"]) for e in plan["layers"]) / plan["summary"]["weights"], abs=1e-3)


def test_detector_returning_a_list_and_non_sequential_statistics() -> None:
    torch.manual_seed(1)
    model = TinyDetector().eval()
    ref = copy.deepcopy(model)
    cq.quantize(model, _images(), method="jlcm", bits=4, allocation="uniform", calib_steps=10, sequential=False)
    errors = {e["name"]: e["error"] for e in model.quantization_plan["layers"]}
    assert set(errors) == {"stem.0", "dw.0", "pw.0", "grouped", "p3", "p4", "head"}
    assert errors["head"] is None, "a layer the forward never calls is quantized without data"
    x = _images(1, seed=5)[0]
    with torch.no_grad():
        for got, want in zip(model(x), ref(x)):
            assert _rel(got, want) < 0.05


def test_linear_only_transformer_encoder() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 10, 32, generator=gen) for _ in range(3)]
    cq.quantize(model, batches, method="jlcm", bits=3, allocation="uniform", calib_steps=30, window=3)
    names = [e["name"] for e in model.quantization_plan["layers"]]
    assert names[:4] == ["layers.0.self_attn", "layers.0.self_attn.out_proj", "layers.0.linear1", "layers.0.linear2"]
    assert isinstance(model.layers[0].self_attn, cq.QuantMultiheadAttention)
    assert all(e["error"] is not None for e in model.quantization_plan["layers"]), "out_proj inputs must be caught too"
    assert not list(model.layers[0].self_attn.named_parameters(recurse=False))[0][0] == "in_proj_weight"
    x = torch.randn(2, 10, 32, generator=gen)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 0.05


def test_mixed_precision_meets_the_average_and_size_targets() -> None:
    torch.manual_seed(0)
    base = TinyMobile().eval()
    model = cq.quantize(copy.deepcopy(base), _images(), method="jlcm", bits=4.0, calib_steps=10, groups=2)
    plan = model.quantization_plan
    assert plan["summary"]["bits_per_weight"] <= 4.0 + 1e-6, "what is quantized meets the target, all stored bits counted"
    assert plan["summary"]["bits_per_weight"] >= 3.0, "the budget is used"
    assert {e["bits"] for e in plan["layers"]} <= {1, 2, 3, 4, 8}
    assert all(e["sensitivity"] is not None for e in plan["layers"])
    measured = 8 * storage_bytes(model) / count_params(model)  # every stored tensor, buffers included
    assert measured == pytest.approx(plan["summary"]["model_bits_per_weight"], abs=1e-3)
    from compress.format.weights import storage_bits

    stored = sum(storage_bits(m.quant_layout) for m in cq.quantized_modules(model).values())
    assert stored / plan["summary"]["weights"] == pytest.approx(plan["summary"]["bits_per_weight"], abs=1e-3)
    floats = plan["summary"]["float_params"]
    assert floats["count"] == count_params(model) - plan["summary"]["weights"] and floats["reasons"]
    target = storage_bytes(base) // 5
    sized = cq.quantize(copy.deepcopy(base), _images(), method="rtn", allocation="mixed", size_bytes=target)
    assert storage_bytes(sized) <= target


def test_baselines_and_ignore_patterns() -> None:
    torch.manual_seed(0)
    base = TinyMobile().eval()
    for method in ("kmeans", "rtn"):
        model = cq.quantize(copy.deepcopy(base), [], method=method, bits=2, ignore=["stem.*", "re:he.d"])
        names = {e["name"] for e in model.quantization_plan["layers"]}
        assert names == {"dw.0", "pw.0", "grouped"}, f"{method}: {names}"
        assert type(model.head) is nn.Linear and type(model.stem[0]) is nn.Conv2d
    nf4 = cq.quantize(copy.deepcopy(base), [], method="nf4")
    assert all(e["layout"]["format"] == "nf4" for e in nf4.quantization_plan["layers"])
    x = _images(1)[0]
    with torch.no_grad():
        assert _rel(nf4(x), base(x)) < 0.05


def test_unknown_options_and_methods_are_refused_with_the_valid_ones() -> None:
    model = TinyMobile()
    with pytest.raises(UserError, match=r"unknown field 'grups'; did you mean 'groups'\?.*calib_steps.*variant"):
        cq.quantize(model, _images(1), method="jlcm", grups=4)
    with pytest.raises(UserError, match=r"unknown quantization method 'kmean'; did you mean 'kmeans'\?.*nf4.*rtn"):
        cq.quantize(model, _images(1), method="kmean")
    with pytest.raises(UserError, match="whole bits"):
        cq.quantize(model, _images(1), method="rtn", bits=2.5)
    with pytest.raises(UserError, match="nf4 is 4 bits"):
        cq.quantize(model, _images(1), method="nf4", bits=2)
    assert not any(isinstance(m, cq.QuantizedWeight) for m in model.modules()), "nothing done on refusal"


def test_a_method_can_be_plugged_in() -> None:
    class HalfConfig(cq.QuantConfig):
        pass

    def halve(weight, stats, bits, config):  # noqa: ANN001, ANN202
        from compress.quant.baselines import encode_rtn

        return encode_rtn(weight / 2, bits)

    try:
        cq.register_method("halve-test", HalfConfig)(halve)
        with pytest.raises(ValueError, match="already registered"):
            cq.register_method("halve-test", HalfConfig)(halve)
        model = cq.quantize(TinyMobile(), [], method="halve-test", bits=8)
        assert model.quantization_plan["method"] == "halve-test"
    finally:
        cq.METHODS.pop("halve-test", None)


def test_plan_bits_is_a_dry_run_of_the_allocation() -> None:
    torch.manual_seed(0)
    model = TinyMobile().eval()
    plan = cq.plan_bits(model, _images(), method="kmeans", allocation="mixed", bits=3.0)
    assert plan["feasible"] and set(plan["bits"]) == {"stem.0", "dw.0", "pw.0", "grouped", "head"}
    assert all(set(v) == {1, 2, 3, 4, 5, 6, 8} for v in plan["sensitivity"].values())
    assert not cq.quantized_modules(model), "plan_bits changes nothing"
    quantized = cq.quantize(copy.deepcopy(model), _images(), method="kmeans", allocation="mixed", bits=3.0)
    assert {e["name"]: e["bits"] for e in quantized.quantization_plan["layers"]} == plan["bits"]
    with pytest.raises(UserError, match=r"target 0.5 bits per quantized weight cannot be met: it needs at least 1\.\d+"):
        cq.plan_bits(model, _images(), method="rtn", allocation="mixed", bits=0.5)


def test_a_config_object_is_accepted_as_the_method() -> None:
    torch.manual_seed(0)
    model = TinyMobile()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    by_name = cq.quantize(copy.deepcopy(model), batches, method="rtn", bits=4)
    by_config = cq.quantize(copy.deepcopy(model), batches, method=cq.RTNConfig(bits=4))
    assert by_config.quantization_plan["method"] == "rtn"
    for a, b in zip(by_name.state_dict().values(), by_config.state_dict().values()):
        assert torch.equal(a, b)
    overridden = cq.quantize(copy.deepcopy(model), batches, method=cq.RTNConfig(bits=4), bits=2)
    assert {e["bits"] for e in overridden.quantization_plan["layers"]} == {2}
    with pytest.raises(UserError, match="not the config of a registered quantization method"):
        cq.quantize(copy.deepcopy(model), batches, method=cq.QuantConfig())
