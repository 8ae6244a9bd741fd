"""Attention maps (Zagoruyko & Komodakis' attention transfer, as used by Chu et al.) and their loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def spatial_attention(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W]: mean over channels of |A|^p (no channel axis: pruned and unpruned compare)."""
    if feature.ndim != 4:
        raise ValueError(f"attention maps need a [B, C, H, W] feature map, got shape {tuple(feature.shape)}")
    return feature.abs().pow(p).mean(dim=1)


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W]: the spatial attention, flattened and L2-normalised per image."""
    return F.normalize(spatial_attention(feature, p).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """mean((Q_T - Q_S)^2) of two feature maps; the student's attention is resized to the teacher's when they differ."""
    target = attention_map(teacher, p)
    if student.shape[-2:] != teacher.shape[-2:]:
        resized = F.interpolate(spatial_attention(student, p)[:, None], size=teacher.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]
        return (target - F.normalize(resized.flatten(1), dim=1)).pow(2).mean()
    return (target - attention_map(student, p)).pow(2).mean()
