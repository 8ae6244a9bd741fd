"""channels_last_on_cpu: opt-in; channels-last inside the block, the default layout after, the same outputs."""
import pytest
import torch
import torch.nn as nn

from compress.models.memory_format import channels_last_on_cpu


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv("COMPRESS_CHANNELS_LAST", "1")


def test_conv_weights_are_channels_last_inside_and_contiguous_after():
    model, x = _convnet(), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    with channels_last_on_cpu(model):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
        with torch.no_grad():
            inside = model(x)
    assert model[0].weight.is_contiguous() and model[3].weight.is_contiguous()
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)


def test_layout_is_restored_when_the_block_raises():
    model = _convnet()
    try:
        with channels_last_on_cpu(model):
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert model[0].weight.is_contiguous()


def test_models_without_conv2d_and_the_default_are_left_alone(monkeypatch):
    linear = nn.Sequential(nn.Linear(4, 4))
    with channels_last_on_cpu(linear, None):
        assert linear[0].weight.is_contiguous()
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("COMPRESS_CHANNELS_LAST")
        else:
            monkeypatch.setenv("COMPRESS_CHANNELS_LAST", value)
        model = _convnet()
        with channels_last_on_cpu(model):
            assert model[0].weight.is_contiguous(), value
