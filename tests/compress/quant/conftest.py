"""Quantization tests run single-threaded: their tensors are small, and on a shared 2-core machine two
threads contending for a core make small matmuls ~50x slower."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Every test here runs with the shared `one_thread` fixture (tests/conftest.py)."""
