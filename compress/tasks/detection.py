"""Object detection: the detector's own loss; mAP@0.5 and mAP@0.5:0.95 from torchmetrics.

Two model protocols: ours (`forward(x) -> raw maps`, `detection_loss`, `postprocess`) and torchvision's
(list of images in, loss dict in train mode, detections in eval mode; class 0 is background, so labels
are shifted by one on the way in and out).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from compress.tasks.base import Task, unwrap


def is_tensor_protocol(model: nn.Module) -> bool:
    """True for detectors that take a batch tensor and expose detection_loss / postprocess."""
    inner = unwrap(model)
    return hasattr(inner, "detection_loss") and hasattr(inner, "postprocess")


def _collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    from calib import collate_detection

    return collate_detection(batch)


class DetectionTask(Task):
    name = "detection"
    primary_metric = "map50"

    def collate_fn(self):
        return _collate

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        if is_tensor_protocol(model):
            return unwrap(model).detection_loss(model(images), targets)
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        losses = model(list(images), shifted)
        loss = sum(losses.values())
        return loss, {k: v.item() for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image: boxes xyxy in pixels, scores, labels in [0, num_classes)."""
        if is_tensor_protocol(model):
            return unwrap(model).postprocess(model(images))
        outputs = model(list(images))
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in outputs]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        from torchmetrics.detection import MeanAveragePrecision  # here: importing torchmetrics costs ~2 s a command

        metric = MeanAveragePrecision(iou_type="bbox")
        device = next(model.parameters()).device
        for images, targets in batches:
            preds = self.predict(model, images.to(device))
            metric.update([{k: v.cpu() for k, v in p.items()} for p in preds],
                          [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets])
        result = metric.compute()
        model.train(was_training)
        return {"map50": float(result["map_50"]), "map": float(result["map"])}

    def example_input(self, model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> Any:
        x = torch.rand(1, 3, image_size, image_size, device=device)
        return x if is_tensor_protocol(model) else [x[0]]
