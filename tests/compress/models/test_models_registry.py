"""Builders by spec prefix, file: builders, and the error messages of bad specs."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from compress.models import ModelSpecError, build_model, register_model, registered_models


def test_compress_models_registered() -> None:
    assert {"digits-cnn", "yolo-n", "yolo-s"} <= set(registered_models())


def test_digits_cnn_forward() -> None:
    model = build_model("compress:digits-cnn", num_classes=7).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_timm_resnet18() -> None:
    model = build_model("timm:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_resnet18() -> None:
    model = build_model("torchvision:resnet18", num_classes=10).eval()
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_detector_random_weights() -> None:
    torch.manual_seed(0)
    model = build_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=11).eval()
    assert model.head.classification_head.module_list[0][1].out_channels % 11 == 0
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_file_builder(tmp_path) -> None:
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(
        """
        from torch import nn

        def tiny(num_classes, hidden=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        """
    ))
    model = build_model(f"file:{path}:tiny", num_classes=3, hidden=5)
    assert model[1].out_features == 5
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, 3)


def test_file_builder_errors(tmp_path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from torch import nn\ndef small_net(num_classes):\n    return nn.Linear(2, num_classes)\n")
    with pytest.raises(ModelSpecError, match=r"does not exist") as e:
        build_model(f"file:{tmp_path / 'nope.py'}:small_net", num_classes=2)
    assert "nope.py" in str(e.value)
    with pytest.raises(ModelSpecError, match=r"did you mean 'small_net'") as e:
        build_model(f"file:{path}:small_nett", num_classes=2)
    assert str(path) in str(e.value)
    with pytest.raises(ModelSpecError, match=r"file:path/to/model.py:function"):
        build_model(f"file:{path}", num_classes=2)


def test_unknown_compress_name_suggests_close_one() -> None:
    with pytest.raises(ModelSpecError) as e:
        build_model("compress:digit-cnn", num_classes=10)
    msg = str(e.value)
    assert "compress:digit-cnn" in msg and "did you mean 'digits-cnn'" in msg
    assert "yolo-n" in msg and "yolo-s" in msg  # lists the known names
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("resnet18", "no prefix"),
        ("timm:", "names no model"),
        ("tim:resnet18", "did you mean 'timm'"),
        ("timm:resnet181", "did you mean 'resnet18'"),
        ("torchvision:resnet_18", "did you mean 'resnet18'"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ModelSpecError, match=needle) as e:
        build_model(spec, num_classes=10)
    assert spec in str(e.value)


def test_register_duplicate_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("yolo-n")(lambda num_classes: nn.Identity())


def test_register_custom_and_build() -> None:
    name = "test-only-linear"
    if name not in registered_models():
        register_model(name)(lambda num_classes, width=2: nn.Linear(width, num_classes))
    assert build_model(f"compress:{name}", num_classes=4, width=3).weight.shape == (4, 3)


@pytest.mark.parametrize(("spec", "option"), [("timm:resnet18", "pretrained"), ("torchvision:resnet18", "weights")])
def test_downloading_weights_is_refused(spec: str, option: str) -> None:
    with pytest.raises(ModelSpecError, match=f"{option} is not supported"):
        build_model(spec, num_classes=10, **{option: True if option == "pretrained" else "DEFAULT"})


def test_raw_forward_gives_a_fixed_size_detector_the_size_its_transform_would() -> None:
    """torchvision:ssd300_vgg16 failed at 128 px ("Kernel size can't be greater than actual input size"): the
    raw path (trace, pruning) skipped the transform that resizes every image to 300x300. A tiny SSD whose last
    layer needs its fixed 32 px input runs on a 16 px batch, with the map shapes its own forward makes."""
    from collections import OrderedDict

    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    from compress.models.protocol import raw_forward, raw_outputs

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
            self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU())
            self.c = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU())  # needs a 3x3 map

        def forward(self, x: torch.Tensor) -> OrderedDict:
            a = self.a(x)
            b = self.b(a)
            return OrderedDict([("0", a), ("1", b), ("2", self.c(b))])

    torch.manual_seed(0)
    model = SSD(Backbone(), DefaultBoxGenerator([[2], [2], [2]]), (32, 32), num_classes=3).eval()
    small = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = raw_forward(model, small)
        with raw_outputs(model):
            want = model(small)
    assert [t.shape for t in out.values()] == [t.shape for t in want.values()]


def test_raw_outputs_nests_and_restores_the_detector_forward() -> None:
    """quantize's BN-pair finder opens raw_outputs inside the quantize stage's own block; the inner exit must not
    strip the outer block's forward, and the outer exit must leave torchvision's forward (boxes out)."""
    from collections import OrderedDict

    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    from compress.models.protocol import raw_outputs

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
            self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU())

        def forward(self, x: torch.Tensor) -> OrderedDict:
            a = self.a(x)
            return OrderedDict([("0", a), ("1", self.b(a))])

    torch.manual_seed(0)
    model = SSD(Backbone(), DefaultBoxGenerator([[2], [2]]), (32, 32), num_classes=3).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        with raw_outputs(model):
            with raw_outputs(model):
                inner = model(images)
            outer = model(images)  # still raw after the inner block closed
        assert isinstance(inner, dict) and isinstance(outer, dict) and set(inner) == set(outer)
        assert "forward" not in vars(model)
        detections = model(list(images))
    assert set(detections[0]) == {"boxes", "scores", "labels"}
