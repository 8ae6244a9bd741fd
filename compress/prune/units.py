"""What pruning reasons about: coupled channels ("units"), the layers they cut ("members") and where their
importance comes from ("carriers"); see `compress.prune.graph` for how they are found."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn


@dataclass
class Member:
    module: str
    dim: str  # "out" or "in"
    local: np.ndarray  # int64 [m] indices along the module's dim
    root: np.ndarray  # int64 [m] unit element of each local index
    optype: int = -1

    def counts(self, size: int) -> np.ndarray:
        """Local indices per unit element: int64 [size]."""
        return np.bincount(self.root, minlength=size)


@dataclass
class Carrier:
    """A source of importance scores for some elements of a unit."""

    name: str  # the BN (gamma) or the producing conv / linear (magnitude) module
    kind: str  # "gamma" | "magnitude"
    roots: np.ndarray  # int64 [k] unit elements it scores (unique)
    locals: list[np.ndarray]  # per element, the local indices in the carrier module
    stride: int | None = None
    group: str = ""
    score: np.ndarray | None = None  # float64 [k], filled by `score_carriers`
    scored_by: str | None = None  # what the score measures when not `kind` ("data": `prune.data_score`)

    @property
    def pool(self) -> str:
        """Scores of one pool share a quantile threshold: per group, per kind of score."""
        return self.scored_by or self.kind


@dataclass
class Unit:
    name: str
    kind: str  # "channels" | "heads"
    size: int
    members: list[Member]
    carriers: list[Carrier]
    ties: np.ndarray | None = None  # int64 [size] class of each element, or None
    balance: list[np.ndarray] = field(default_factory=list)  # each int64 [parts, part_size] of elements
    reason: str | None = None
    exact: bool = True  # removal can be checked exactly against a masked copy
    root_module: nn.Module | None = None
    root_fn: Callable | None = None
    attention: str | None = None  # for "heads" units: the attention module's name

    @property
    def prunable(self) -> bool:
        return self.reason is None
