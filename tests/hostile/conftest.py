"""Tiny fixtures of the hostile-input corpus, built once per session: an artifact (digits-cnn, one block
pruned by hand, two layers quantized: one with packed group ids, one with a row order), a stage checkpoint,
a finished one-stage run, and helpers to forge files with valid checksums and to check that a refusal
changed nothing on disk."""
from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

SPEC = {"build": "compress:digits-cnn", "num_classes": 10, "options": {}}

RUN_RECIPE = """
name: hostile-run
seed: 0
model: {build: "compress:digits-cnn", num_classes: 10}
task: classification
image_size: 32
data:
  train: {source: digits, split: train, samples: 16}
  val: {source: digits, split: val, samples: 16}
train: {batch_size: 16, eval_batch_size: 16}
stages:
  - evaluate: {split: val}
"""


def quantized_model() -> tuple[nn.Module, dict[str, Any]]:
    """digits-cnn with stage3.conv1 cut 64 -> 40 channels and two layers quantized (group ids / row order)."""
    from compress.models import build_model
    from compress.format.prune_manifest import make_manifest, snapshot
    from compress.format.restorers import PLAN_FORMAT
    from compress.format.weights import encode_codebook, matrix_shape
    from compress.format.layers import attach_quantized

    torch.manual_seed(0)
    model = build_model(SPEC["build"], num_classes=10).eval()
    before = snapshot(model)
    block = model.stage3
    block.conv1[0] = nn.Conv2d(64, 40, 3, padding=1, bias=False)
    block.conv1[1] = nn.BatchNorm2d(40)
    block.conv2[0] = nn.Conv2d(40, 64, 3, padding=1, bias=False)
    model.eval()
    manifest = make_manifest(before, model)
    layers = []
    for name, bits, row_map in (("stage3.conv2.0", 2, "group-ids"), ("head", 3, "order")):
        module = model.get_submodule(name)
        rows, cols = matrix_shape(module.weight.shape)
        gen = torch.Generator().manual_seed(bits)
        idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
        order = torch.randperm(rows, generator=gen)
        count = 3 if row_map == "group-ids" else 2  # 3 groups: ids take 2 bits, so a forged id can be 3
        groups = torch.empty(rows, dtype=torch.long)
        groups[order] = torch.arange(rows) * count // rows
        layout, buffers = encode_codebook(module.weight.shape, bits, idx, groups, count,
                                          torch.randn(count, 1 << bits, generator=gen) * 0.1, row_map=row_map,
                                          order=order)
        attach_quantized(module, layout, buffers)
        layers.append({"name": name, "attr": "weight", "layout": layout})
    plan = {"format": PLAN_FORMAT, "layers": layers}
    model.quantization_plan = plan
    return model, {"prune": manifest, "quantization": plan}


def write_forged_artifact(path: Path, tensors: dict[str, torch.Tensor], manifest: Any, raw_manifest: str | None = None) -> Path:
    """A (format version 2) artifact with valid checksums around whatever `manifest` (or `raw_manifest` text) says."""
    from compress.format.header import tensors_sha256
    from compress.format.checkpoint import atomic_save_safetensors
    from compress.format.container import MANIFEST, pack_container

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if raw_manifest is None and isinstance(manifest, dict):
        manifest = {**manifest, "tensors_sha256": tensors_sha256(tensors), "tensor_count": len(tensors)}
        stored, metadata = pack_container(tensors, manifest)  # adds the container's tensor index
    else:  # text that is not a JSON object: no index can go in
        if raw_manifest is None:
            raw_manifest = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        stored, _ = pack_container(tensors, {})
        stored[MANIFEST] = torch.frombuffer(bytearray(zlib.compress(raw_manifest.encode(), 9)), dtype=torch.uint8)
        metadata = {"manifest_encoding": "zlib", "manifest_sha256": hashlib.sha256(raw_manifest.encode()).hexdigest()}
    atomic_save_safetensors(path, stored, {"format": "compress-artifact/2", **metadata})
    return path


def write_forged_checkpoint(path: Path, tensors: dict[str, torch.Tensor], spec: Any, meta: Any,
                            checksum: bool = True) -> Path:
    """A stage checkpoint whose metadata says `spec` / `meta`, with a valid tensor checksum."""
    from compress.format.header import tensors_sha256
    from compress.format.checkpoint import atomic_save_safetensors

    metadata = {"compress.model_spec": json.dumps(spec), "compress.model_meta": json.dumps(meta)}
    if checksum:
        metadata["compress.tensors_sha256"] = tensors_sha256(tensors)
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in tensors.items()}, metadata)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The originals every case starts from (never modified by a case: cases copy what they change)."""
    from compress.format.artifact import read_artifact, write_artifact
    from compress.format.checkpoint import save_model
    from compress.models import build_model

    base = tmp_path_factory.mktemp("hostile-corpus")
    model, meta = quantized_model()
    artifact = base / "model.safetensors"
    write_artifact(artifact, model, {"model": SPEC, "model_meta": meta, "task": "classification", "image_size": 32,
                                     "eval_batch_size": 16, "metrics": {}})
    tensors, manifest = read_artifact(artifact)
    torch.manual_seed(0)
    plain = build_model(SPEC["build"], num_classes=10).eval()
    checkpoint = base / "stage.safetensors"
    save_model(checkpoint, plain, SPEC, {})
    state_dict = base / "weights.pt"
    torch.save(plain.state_dict(), state_dict)
    return {"base": base, "artifact": artifact, "tensors": tensors, "manifest": manifest, "model": model,
            "checkpoint": checkpoint, "plain": plain, "state_dict": state_dict}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished one-stage run (input + evaluate) of RUN_RECIPE, made through the CLI."""
    from compress.cli import main

    base = tmp_path_factory.mktemp("hostile-run")
    recipe = base / "recipe-src.yaml"
    recipe.write_text(RUN_RECIPE)
    out = base / "run"
    assert main(["--quiet", "run", str(recipe), "--out", str(out)]) == 0
    return {"recipe": recipe, "run": out}


@pytest.fixture
def run_copy(finished_run: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run["run"], out)
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show that a refusal changed or left nothing)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys: pytest.CaptureFixture, argv: list[str], pattern: str, watch: Path,
            setup: Callable[[], None] | None = None) -> str:
    """Run the CLI in-process: exit 2, one stderr line matching `pattern`, no traceback, nothing under `watch`
    changed, added or removed."""
    import re

    from compress.cli import main

    before = tree(watch)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), f"{pattern!r} not in: {err}"
    assert tree(watch) == before, f"files changed under {watch}: {sorted(set(tree(watch)) ^ set(before))}"
    return err
