"""A prior for a linear layer fed the spatial mean of a feature map (a classifier after global average pooling).

Such a layer sees one row per calibration image: 128 crops give 128 rows for MobileNetV2's 1,280 inputs, so its
input second moment cannot say which weight errors other photos will see. The map before the pooling holds more:
each image's positions vary around their mean in the directions its features take. The within-image moment of the
positions, E[(f_p - mean_p f)(f_p - mean_p f)^T], scaled to the pooled moment's trace, is added to that moment
(`LayerStats.with_prior`): a data-shaped ridge instead of the plain one (damp). The map is found by what it is,
not by name: the last output of the model's modules, before the layer's call, of shape [B, C, *S] (S > 1
position) whose spatial mean equals the layer's input [B, C].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["MapCatcher", "within_map_moment", "is_spatial_mean"]


def within_map_moment(feature_map: torch.Tensor) -> torch.Tensor:
    """Sum over images and positions of the outer products of each position's features minus its image's mean
    [C, C] (float64) of a map [B, C, *S]."""
    rows = feature_map.flatten(2).float()
    rows = (rows - rows.mean(2, keepdim=True)).transpose(1, 2).reshape(-1, feature_map.shape[1])
    return (rows.t() @ rows).double()


def is_spatial_mean(feature_map: torch.Tensor, x: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether x [B, C] is the mean of the map [B, C, *S] over its positions (to float rounding)."""
    if x.dim() != 2 or feature_map.shape[:2] != x.shape:
        return False
    mean = feature_map.flatten(2).float().mean(2)
    scale = float(mean.abs().max()) if mean.numel() else 0.0
    return float((mean - x.float()).abs().max()) <= rtol * scale + 1e-6


class MapCatcher:
    """Forward hooks on every module of a model keeping the last output with `channels` channels and more than one
    position; `moment(x)` gives the within-map moment of that output when x is its spatial mean (else None)."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        self.channels, self.last = channels, None

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            if torch.is_tensor(out) and out.dim() >= 3 and out.shape[1] == self.channels and out[0, 0].numel() > 1:
                self.last = out

        self.handles = [m.register_forward_hook(keep) for m in model.modules()]

    def moment(self, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """(summed within-map moment, positions) of the map x is the spatial mean of; None when there is none."""
        found, self.last = self.last, None
        if found is None or not is_spatial_mean(found.detach(), x.detach()):
            return None
        return within_map_moment(found.detach()), found[0, 0].numel() * found.shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.last = None
