"""prune -> forward -> reload from the shape manifest, on every architecture the product promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.format.checkpoint import load_model, save_model
from compress.models import build_model
from compress.prune import PruneConfig, prune_model
from compress.models.protocol import flat_tensors, raw_forward

NUM_CLASSES = 4
TV = {"min_size": 64, "max_size": 64}
# spec, builder options, input side, prune settings
CASES = {
    "compress:yolo-n": ({}, 64, {"target": {"params": 0.6}}),
    "compress:yolo-s": ({}, 64, {"ratios": {"*": 0.4}}),
    "timm:resnet50": ({}, 64, {"target": {"macs": 0.4}}),
    "timm:mobilenetv3_large_100": ({}, 64, {"ratios": {"*": 0.4}}),
    "timm:efficientnet_b0": ({}, 64, {"ratios": {"*": 0.4}}),
    "timm:convnext_tiny": ({}, 64, {"ratios": {"*": 0.3}}),
    "timm:regnety_008": ({}, 64, {"ratios": {"*": 0.4}}),
    "timm:vit_tiny_patch16_224": ({"img_size": 32}, 32, {"target": {"macs": 0.4}}),
    "torchvision:ssdlite320_mobilenet_v3_large": ({}, 64, {"ratios": {"*": 0.4}}),
    "torchvision:fcos_resnet50_fpn": (TV, 64, {"ratios": {"*": 0.4}}),
    "torchvision:retinanet_resnet50_fpn_v2": (TV, 64, {"ratios": {"*": 0.4}}),
    "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn": (TV, 64, {"ratios": {"*": 0.4}}),
    # its own protocol (`model([image])`) keeps 10 detections of 100 proposals (not 100 of 1000): the mask head
    # runs on what it keeps
    "torchvision:maskrcnn_resnet50_fpn": ({**TV, "box_detections_per_img": 10, "rpn_post_nms_top_n_test": 100}, 64,
                                          {"ratios": {"*": 0.4}}),
}
SLOW = {"timm:resnet50", "timm:convnext_tiny", "timm:regnety_008", "torchvision:ssdlite320_mobilenet_v3_large",
        "torchvision:fcos_resnet50_fpn", "torchvision:retinanet_resnet50_fpn_v2", "torchvision:maskrcnn_resnet50_fpn"}
# pruned from one example image instead of two: Mask R-CNN's mask head runs on 144 grid boxes an image (four
# 256-channel convs at 14 x 14); positions and boxes still vary within the image, so constant channels stay measurable
ONE_IMAGE = {"torchvision:maskrcnn_resnet50_fpn"}


def _build(spec: str) -> torch.nn.Module:
    options, _, _ = CASES[spec]
    torch.manual_seed(0)
    model = build_model(spec, num_classes=NUM_CLASSES, **options)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # spread the gammas as sparse training would
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g) ** 2
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return model.eval()


@torch.no_grad()
def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return flat_tensors(raw_forward(model.eval(), x))


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in CASES])
def test_prune_forward_reload(spec: str, tmp_path: Path) -> None:
    _, side, settings = CASES[spec]
    model = _build(spec)
    x = torch.rand(1 if spec in ONE_IMAGE else 2, 3, side, side)
    before = _outputs(model, x)
    result = prune_model(model, PruneConfig(**settings), x, log=lambda _: None)
    figures = result.figures
    assert figures["params_ratio"] < 0.9 and figures["macs_ratio"] < 0.95, figures
    if "target" in settings:
        (metric, share), = settings["target"].items()
        assert figures[f"{metric}_ratio"] <= 1 - share + 0.01, (figures, settings)
    after = _outputs(model, x)
    assert [t.shape for t in after] == [t.shape for t in before], "pruning never changes output shapes"
    if spec.startswith("torchvision:"):
        detections = model([x[0]])  # the detector's own protocol still works
        assert {"boxes", "scores", "labels"} <= set(detections[0])
    elif spec.startswith("compress:yolo"):
        assert [tuple(t.shape) for t in model(x)] == [(2, 4 + NUM_CLASSES, side // s, side // s) for s in (8, 16, 32)]
    else:
        assert model(x).shape == (2, NUM_CLASSES)
    if spec == "timm:vit_tiny_patch16_224":
        assert figures["heads_removed"] > 0, "attention heads are pruned"
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"build": spec, "num_classes": NUM_CLASSES, "options": CASES[spec][0]},
               {"prune": result.manifest})
    reloaded, meta = load_model(path)
    assert json.loads(json.dumps(meta["prune"])) == result.manifest, "the manifest is plain JSON"
    for a, b in zip(after, _outputs(reloaded, x)):
        assert torch.equal(a, b), f"{spec}: reloaded model differs"


RELOAD = """
import sys, torch
import compress.prune  # registers the 'prune' restorer
from compress.format.checkpoint import load_model
from compress.models.protocol import flat_tensors, raw_forward
x = torch.load(sys.argv[2])
model, _ = load_model(sys.argv[1])
with torch.no_grad():
    torch.save(flat_tensors(raw_forward(model.eval(), x)), sys.argv[3])
"""


@pytest.mark.slow
def test_pruned_checkpoint_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    spec = "compress:yolo-n"
    model = _build(spec)
    x = torch.rand(2, 3, 64, 64)
    result = prune_model(model, PruneConfig(target={"params": 0.5}), x, log=lambda _: None)
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"build": spec, "num_classes": NUM_CLASSES, "options": {}}, {"prune": result.manifest})
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = torch.load(tmp_path / "y.pt")
    for a, b in zip(_outputs(model, x), fresh):
        assert torch.equal(a, b), "a fresh process rebuilds the same pruned model"
