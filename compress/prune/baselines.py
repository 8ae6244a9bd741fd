"""The pruning baseline our group pruning is compared with: torch-pruning's uniform magnitude pruning.

Every prunable unit (a torch-pruning group of coupled channels) loses the same share `r` of its channels,
ranked by the L2 norm of their weights summed over the unit's conv / linear members (torch-pruning's
`GroupMagnitudeImportance(p=2)` with mean reduction); `r` is bisected to meet a MACs or params target.
No BN scales, no groups, no folding: what `tp.pruner.MagnitudePruner(global_pruning=False)` does. It runs on
our dependency graph (`compress.prune.graph`) so it also handles the C2f split + cat that torch-pruning's
own graph gets wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.prune.config import ScopeConfig
from compress.prune.core import PruneResult, measure, prepare, remove_units
from compress.prune.graph import Analysis, Unit
from compress.format.prune_manifest import make_manifest, snapshot
from compress.prune.masks import apply_balance, apply_floor, floor_count, top_k
from compress.prune.search import CostModel
from compress.errors import PruneError


@torch.no_grad()
def magnitude_importance(analysis: Analysis, unit: Unit) -> np.ndarray:
    """float64 [size]: per element, the mean L2 norm of its weight slices in the unit's conv / linear members."""
    modules = dict(analysis.model.named_modules())
    total = np.zeros(unit.size)
    count = np.zeros(unit.size)
    for member in unit.members:
        module = modules.get(member.module)
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or weight is None:
            continue
        if member.dim == "out":
            norms = weight.detach().flatten(1).norm(dim=1)
        elif getattr(module, "groups", 1) == 1:
            norms = weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
        else:  # a grouped conv's input channels are its output channels' slices: counted on the out side
            continue
        np.add.at(total, member.root, norms.double().numpy()[member.local])
        np.add.at(count, member.root, 1)
    return total / np.maximum(count, 1)


def uniform_keep(unit: Unit, importance: np.ndarray, ratio: float, floor: int) -> np.ndarray:
    """bool [size]: keep the (1 - ratio) most important elements (whole tie classes, equal chunk parts)."""
    if unit.ties is not None:
        n_classes = int(unit.ties.max()) + 1
        class_imp = np.bincount(unit.ties, importance, n_classes) / np.maximum(np.bincount(unit.ties, minlength=n_classes), 1)
        keep = top_k(class_imp, n_classes - int(ratio * n_classes))[unit.ties]
    else:
        keep = top_k(importance, unit.size - int(ratio * unit.size))
    for parts in unit.balance:
        keep = apply_balance(keep, parts, importance)
    return apply_floor(keep, importance, floor, unit.ties, unit.balance)


def uniform_magnitude_prune(model: nn.Module, example_input: Any, target: dict[str, float],
                            scope: ScopeConfig | None = None, log: Callable[[str], None] = print,
                            iterations: int = 30) -> PruneResult:
    """Prune every unit by the same ratio, the smallest that removes at least `target[m]` of each metric m."""
    x, was_training, before, analysis, units = prepare(model, example_input, scope)
    importance = [magnitude_importance(analysis, u) for u in units]
    floors = [floor_count(u.size) for u in units]
    cost = CostModel(analysis, units)

    def keeps_at(ratio: float) -> list[np.ndarray]:
        return [uniform_keep(u, imp, ratio, f) for u, imp, f in zip(units, importance, floors)]

    def met(ratio: float) -> bool:
        for i, keep in enumerate(keeps_at(ratio)):
            cost.set_unit(i, keep)
        return all(cost.removed_share(m) >= t for m, t in target.items())

    low, high = 0.0, 0.99
    if not met(high):
        raise PruneError(f"uniform pruning cannot remove {target} even at ratio {high}")
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (low, mid) if met(mid) else (mid, high)
    keeps = keeps_at(high)
    log(f"prune (uniform magnitude): ratio {high:.4f} in each of {len(units)} units")
    shapes = snapshot(model)
    remove_units(analysis, units, keeps, verify=True, scope=scope)
    model.train(was_training)
    after = measure(model, x)
    figures = {"params_ratio": after["params"] / before["params"],
               "macs_ratio": after["macs"] / max(before["macs"], 1.0),
               "channels_removed": float(sum(int((~k).sum()) for k in keeps))}
    log(f"prune (uniform magnitude): params x{figures['params_ratio']:.3f}, MACs x{figures['macs_ratio']:.3f}")
    return PruneResult(model, make_manifest(shapes, model), {"uniform": high}, figures)
