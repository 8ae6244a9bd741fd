"""Shared fixtures: a private data cache and small recipes that run in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: a second torch thread per worker (or per CLI subprocess) would contend for the
    # other worker's core, and small matmuls get ~50x slower when two threads share one.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated data goes to a cache shared by this test session only."""
    if "COMPRESS_CACHE" not in os.environ:
        os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("compress-cache"))


TINY_CLS_RECIPE = """
name: tiny-cls
seed: 0
model: {build: "compress:digits-cnn", num_classes: 10}
task: classification
image_size: 32
data:
  train: {source: digits, split: train, samples: 128}
  val: {source: digits, split: val, samples: 64}
  calib: {source: digits, split: calib, samples: 32}
train: {batch_size: 32, eval_batch_size: 64}
stages:
  - finetune: {epochs: 1, lr: 3.0e-3, warmup_epochs: 0}
  - evaluate: {split: calib}
  - finetune: {epochs: 1, lr: 1.0e-3, warmup_epochs: 0}
"""


@pytest.fixture
def tiny_recipe_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CLS_RECIPE)
    return path


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: one torch thread avoids two contending for a core (small
    matmuls get ~50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the slow tests go first so that neither worker ends the run alone on a long one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
