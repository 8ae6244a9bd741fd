"""channels_last_on_cpu: channels-last inside the block for the scopes that are on, the default layout after,
the same outputs; by default the sensitivity and recovery scopes are on, the fits off."""
import pytest
import torch
import torch.nn as nn

from compress.models.memory_format import channels_last_on_cpu


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _is_channels_last(model: nn.Module) -> bool:
    w = model[0].weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_conv_weights_are_channels_last_inside_and_contiguous_after(monkeypatch):
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")
    model, x = _convnet(), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    with channels_last_on_cpu(model, scope="fit"):
        assert _is_channels_last(model)
        with torch.no_grad():
            inside = model(x)
    assert model[0].weight.is_contiguous() and model[3].weight.is_contiguous()
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)


def test_layout_is_restored_when_the_block_raises(monkeypatch):
    monkeypatch.delenv("COMPRESS_CHANNELS_LAST", raising=False)
    model = _convnet()
    try:
        with channels_last_on_cpu(model, scope="sensitivity"):
            assert _is_channels_last(model)
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert model[0].weight.is_contiguous()


@pytest.mark.parametrize(("value", "on"), [(None, {"sensitivity", "recovery"}), ("0", set()),
                                           ("1", {"sensitivity", "fit", "recovery"})])
def test_scopes_on_by_default_and_with_the_variable(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("COMPRESS_CHANNELS_LAST", raising=False)
    else:
        monkeypatch.setenv("COMPRESS_CHANNELS_LAST", value)
    for scope in ("sensitivity", "fit", "recovery"):
        model = _convnet()
        with channels_last_on_cpu(model, scope=scope):
            assert _is_channels_last(model) == (scope in on), (value, scope)
        assert model[0].weight.is_contiguous()


def test_an_inner_block_leaves_the_outer_layout(monkeypatch):
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")
    model = _convnet()
    with channels_last_on_cpu(model, scope="fit"):
        with channels_last_on_cpu(model, scope="sensitivity"):
            assert _is_channels_last(model)
        assert _is_channels_last(model)
    assert model[0].weight.is_contiguous()


def test_models_without_conv2d_are_left_alone(monkeypatch):
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")
    linear = nn.Sequential(nn.Linear(4, 4))
    with channels_last_on_cpu(linear, None, scope="fit"):
        assert linear[0].weight.is_contiguous()


def test_models_with_5d_parameters_are_switched_too(monkeypatch):
    """Module.to(memory_format=channels_last) fails on 5-D tensors; only the 4-D ones are switched."""
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")
    model = _convnet()
    model.register_parameter("pos", nn.Parameter(torch.randn(1, 2, 3, 4, 5)))
    with channels_last_on_cpu(model, scope="fit"):
        assert _is_channels_last(model) and model.pos.is_contiguous()
    assert model[0].weight.is_contiguous()


class _ViewNet(nn.Module):
    """`x.view(B, -1)` on a conv output: fails in channels-last (not viewable), works in the default layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_a_model_whose_code_needs_the_default_layout_keeps_it(monkeypatch):
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")
    model, x = _ViewNet().eval(), torch.randn(2, 3, 9, 9)
    with channels_last_on_cpu(model, scope="fit"):
        with pytest.raises(RuntimeError):
            model(x)
    with channels_last_on_cpu(model, scope="fit", probe=lambda: model(x)):
        assert model.conv.weight.is_contiguous()
        assert model(x).shape == (2, 2)
    convnet = _convnet()
    with channels_last_on_cpu(convnet, scope="fit", probe=lambda: convnet(x)):
        assert _is_channels_last(convnet), "a probe that runs keeps the layout"
