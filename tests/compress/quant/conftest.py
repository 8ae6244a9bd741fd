"""Quantization tests run single-threaded: their tensors are small, and on a shared 2-core machine two
threads contending for a core make small matmuls ~50x slower."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
