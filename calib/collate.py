"""Batching of detection items, whose targets have a different number of boxes per image."""

from __future__ import annotations

import torch


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images into [B, 3, H, W] and keep the per-image target dicts as a list."""
    images = [image for image, _ in batch]
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"collate_detection: images of one batch must share a shape (got {sorted(sizes)})")
    return torch.stack(images), [target for _, target in batch]
