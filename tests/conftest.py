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
    """Generated data goes to a cache shared by this test session only (by all its pytest-xdist workers: the cache
    writes each file atomically, so two workers building the same split at once is safe, and each split is built
    once for the session, not once a worker)."""
    if "COMPRESS_CACHE" not in os.environ:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            from tests.session_once import session_folder

            shared = session_folder(tmp_path_factory) / "compress-cache"
            shared.mkdir(exist_ok=True)
            os.environ["COMPRESS_CACHE"] = str(shared)
        else:
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


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The runs of tests/compress/two_processes.py, made by one `torchrun --nproc_per_node 2` launch for the
    session, whichever pytest-xdist worker gets there first (each test that needs two CPU processes checks its own
    runs of it)."""
    from tests.compress.two_processes import launch
    from tests.session_once import once_per_session

    runs = once_per_session(tmp_path_factory, "two-processes", lambda folder: launch(TINY_CLS_RECIPE, folder))
    return {k: Path(v) if k in ("ddp", "sparse", "plain") else v for k, v in runs.items()}


@pytest.fixture(scope="session")
def fresh_interpreter(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What a fresh interpreter imports for `compress.load`, `compress.kernels` and the CLI: one subprocess for the
    session (tests/compress/fresh_interpreter.py), whose parts several tests check."""
    from tests.compress.fresh_interpreter import probe
    from tests.session_once import once_per_session

    return once_per_session(tmp_path_factory, "fresh-interpreter", lambda folder: probe())


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
    """Under pytest-xdist, every worker starts with its share of the slow tests (dealt in turn) and ends on short
    ones, so that neither worker ends the run alone on a long one.

    The work-stealing scheduler (below) first hands each worker one contiguous block of the collection (the first
    n // k tests to the first worker, and so on); the slow tests are placed at the head of those blocks. (With
    xdist's `load` scheduler and the slow tests sorted to the front, all of them fell into the first worker's
    first chunk of n / k / 4 tests: about half of the suite's time on one worker, in a fixed queue.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    rest = [item for item in items if item.get_closest_marker("slow") is None]
    sizes, left = [], len(items)
    for remaining in range(workers, 0, -1):  # the scheduler's first split: n // k, then the rest evenly
        sizes.append(left // remaining)
        left -= sizes[-1]
    ordered: list[pytest.Item] = []
    for block, size in enumerate(sizes):
        head = slow[block::workers]
        take = max(0, size - len(head))
        ordered += head + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`-n N` (xdist's `load` distribution) runs with work stealing: a worker that runs out of tests takes half of
    the other's queue, instead of the other finishing its fixed chunk alone. Tests run as before, one each."""
    if config.getvalue("dist") == "load":
        from xdist.scheduler import WorkStealingScheduling

        return WorkStealingScheduling(config, log)
    return None
