"""Restorers run in priority order (prune's shapes before the quantized layout), whatever the order of the
keys in the stored metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from compress.format.artifact import load, write_artifact
from compress.format.checkpoint import load_model, save_model
from compress.format.restorers import (PLAN_FORMAT, RESTORER_PRIORITY, RESTORERS, apply_restorers, register_restorer,
                                       restorer_order)
from compress.models import build_model
from compress.format.prune_manifest import make_manifest, snapshot
from compress.format.weights import encode_codebook, matrix_shape
from compress.format.layers import QuantizedWeight, attach_quantized

SPEC = {"build": "compress:digits-cnn", "num_classes": 10, "options": {}}


def test_priority_not_key_order_decides() -> None:
    calls: list[str] = []
    keys = {"zz-early": 1, "aa-late": 10_000, "mm-default": None}
    try:
        for key, priority in keys.items():
            kwargs = {} if priority is None else {"priority": priority}
            register_restorer(key, **kwargs)(lambda model, value, key=key: calls.append(key) or model)
        meta = {"aa-late": 0, "mm-default": 0, "unknown": 0, "zz-early": 0}
        assert restorer_order(meta) == ["zz-early", "mm-default", "aa-late"]
        apply_restorers(nn.Identity(), meta)
        assert calls == ["zz-early", "mm-default", "aa-late"], "restorers must run by priority"
        with pytest.raises(ValueError, match="already registered"):
            register_restorer("aa-late")(lambda model, value: model)
    finally:
        for key in keys:
            RESTORERS.pop(key, None)
            RESTORER_PRIORITY.pop(key, None)
    assert restorer_order(["quantization", "prune"]) == ["prune", "quantization"]


def _pruned_quantized() -> tuple[nn.Module, dict[str, Any]]:
    """digits-cnn with stage3's inner width cut 64 -> 40 (by hand), then two layers quantized (one of them
    pruned: its layout has the pruned shape, so it only fits after the prune manifest)."""
    torch.manual_seed(0)
    model = build_model(SPEC["build"], num_classes=10).eval()
    before = snapshot(model)
    block = model.stage3
    block.conv1[0] = nn.Conv2d(64, 40, 3, padding=1, bias=False)
    block.conv1[1] = nn.BatchNorm2d(40)
    block.conv2[0] = nn.Conv2d(40, 64, 3, padding=1, bias=False)
    model.eval()  # the new BatchNorm too
    manifest = make_manifest(before, model)
    assert set(manifest["modules"]) == {"stage3.conv1.0", "stage3.conv1.1", "stage3.conv2.0"}
    layers = []
    for name, bits in (("stage3.conv2.0", 2), ("head", 3)):
        module = model.get_submodule(name)
        rows, cols = matrix_shape(module.weight.shape)
        gen = torch.Generator().manual_seed(bits)
        idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
        layout, buffers = encode_codebook(module.weight.shape, bits, idx, torch.arange(rows) % 2, 2,
                                          torch.randn(2, 1 << bits, generator=gen))
        attach_quantized(module, layout, buffers)
        layers.append({"name": name, "attr": "weight", "layout": layout})
    plan = {"format": PLAN_FORMAT, "layers": layers}
    model.quantization_plan = plan
    # the quantization key first: restorers applied in key order would attach the [64, 40, 3, 3] layout to
    # the stock [64, 64, 3, 3] conv
    return model, {"quantization": plan, "prune": manifest}


def test_pruned_then_quantized_model_restores_whatever_the_meta_order(tmp_path: Path) -> None:
    model, meta = _pruned_quantized()
    assert list(meta) == ["quantization", "prune"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    fresh = apply_restorers(build_model(SPEC["build"], num_classes=10), meta)
    assert isinstance(fresh.stage3.conv2[0], QuantizedWeight) and fresh.stage3.conv1[0].out_channels == 40
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), want)
    # through a stage checkpoint and an artifact too
    save_model(tmp_path / "ckpt.safetensors", model, SPEC, meta)
    loaded, _ = load_model(tmp_path / "ckpt.safetensors")
    write_artifact(tmp_path / "model.safetensors", model, {"model": SPEC, "model_meta": meta, "metrics": {}})
    for restored in (loaded, load(tmp_path / "model.safetensors")):
        with torch.no_grad():
            assert torch.equal(restored.eval()(x), want)


def test_bn_fold_restores_after_prune_and_before_quantization(tmp_path: Path) -> None:
    """Pruned, then quantized, then its BNs folded at export: the artifact rebuilds the folded model exactly."""
    from compress.format.header import ArtifactError
    from compress.quant.fold import remove_batchnorms

    model, meta = _pruned_quantized()
    x = torch.rand(2, 3, 32, 32)
    pairs = remove_batchnorms(model, x)  # float convs only here (the quantized one has a real BN after it)
    assert ["stage3.conv1.0", "stage3.conv1.1"] in pairs and len(pairs) >= 3
    meta = {"bn_fold": {"pairs": pairs}, **meta}
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "model.safetensors"
    write_artifact(path, model, {"model": SPEC, "model_meta": meta, "metrics": {}})
    restored = load(path)
    assert not any(type(m) is nn.BatchNorm2d for n, m in restored.named_modules() if n in dict(pairs).values())
    with torch.no_grad():
        assert torch.equal(restored(x), want)
    for bad, field in (({"pairs": [["stage3.conv1.0"]]}, "pairs.0"), ({"pairs": [["head", "head"]]}, "pairs.0"),
                       ({"pairs": [], "x": 1}, "bn_fold"), ({"pairs": [["stage3.conv1.1", "stage3.conv1.0"]]}, "bn_fold pair")):
        write_artifact(path, model, {"model": SPEC, "model_meta": {**meta, "bn_fold": bad}, "metrics": {}})
        with pytest.raises(ArtifactError, match=field):
            load(path)
