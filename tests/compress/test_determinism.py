"""Same recipe + seed gives the same artifact, byte for byte, through every stage."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from compress.pipeline import run
from compress.recipe import load_recipe

FULL_CHAIN = """
name: tiny-chain
seed: 3
model: {build: "compress:digits-cnn", num_classes: 10}
task: classification
image_size: 32
data:
  train: {source: digits, split: train, samples: 96}
  val: {source: digits, split: val, samples: 32}
  calib: {source: digits, split: calib, samples: 16}
train: {batch_size: 32, eval_batch_size: 64}
stages:
  - finetune: {epochs: 1, lr: 3.0e-3, warmup_epochs: 0}
  - sparse: {epochs: 1, lr: 1.0e-2, warmup_epochs: 0, sparsity_rate: 1.0e-2}
  - prune: {target: {params: 0.5}}
  - distill: {epochs: 1, lr: 1.0e-3, warmup_epochs: 0}
  - quantize: {method: jlcm, bits: 2.0, calib_steps: 40}
  - export: {}
"""


@pytest.mark.slow
def test_same_recipe_and_seed_give_a_byte_identical_artifact(tmp_path: Path) -> None:
    recipe_path = tmp_path / "chain.yaml"
    recipe_path.write_text(FULL_CHAIN)
    digests = []
    for attempt in ("a", "b"):
        run(load_recipe(recipe_path), tmp_path / attempt)
        digests.append(hashlib.sha256((tmp_path / attempt / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_checkpoint_bytes_do_not_depend_on_metadata_order(tmp_path: Path) -> None:
    import torch

    from compress.format.checkpoint import atomic_save_safetensors

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16)}
    keys = [f"key{i}" for i in range(20)]
    atomic_save_safetensors(tmp_path / "x.safetensors", tensors, {k: k.upper() for k in keys})
    atomic_save_safetensors(tmp_path / "y.safetensors", tensors, {k: k.upper() for k in reversed(keys)})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    from safetensors.torch import load_file
    loaded = load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
