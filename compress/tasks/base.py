"""The task interface shared by the training loop, the stages and evaluation."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/FSDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


class Task(ABC):
    name: str
    primary_metric: str

    def collate_fn(self) -> Callable | None:
        return None

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
        """A DataLoader with a seeded shuffle, so a stage sees the same order on every run."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self.collate_fn(), num_workers=num_workers, drop_last=False)

    @staticmethod
    def inputs(batch: Any) -> torch.Tensor:
        """The image tensor of a batch, as the model takes it."""
        return batch[0]

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Task loss of one batch (model in train mode, possibly DDP-wrapped) and its named parts."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Metrics of `model` over `batches`; puts the model in eval mode and restores its mode."""

    def example_input(self, model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> Any:
        """One input at the task's size, for tracing, MAC counting and export."""
        return torch.rand(1, 3, image_size, image_size, device=device)
