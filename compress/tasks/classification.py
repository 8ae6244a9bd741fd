"""Image classification: cross-entropy loss, top-1 accuracy."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.tasks.base import Task


class ClassificationTask(Task):
    name = "classification"
    primary_metric = "top1"

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        return loss, {"ce": loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = total = 0
        device = next(model.parameters()).device
        for images, labels in batches:
            logits = model(images.to(device))
            correct += (logits.argmax(1).cpu() == labels.cpu()).sum().item()
            total += labels.numel()
        model.train(was_training)
        return {"top1": correct / max(total, 1)}
