"""Searching the per-group ratios p_g that meet a target share of parameters or MACs to remove.

How the paper chose its p_g is not public; this is our method. `CostModel` gives the parameters and MACs
of the model after any set of unit masks, exactly for parameters (every tensor of a cut layer scales with
the kept share of each cut axis) and for conv / linear MACs (weight size x output positions from the
trace). The search is greedy over the groups:

    start with p_g = 0 for every group
    repeat until the removed share reaches the target:
        for every group g, try p_g + step; measure
            d_cost = params (or MACs) removed by the move,  d_mass = normalised importance removed
        take the move with the least d_mass / d_cost (the least importance lost per unit of cost);
        a move that removes nothing is taken only when no move removes anything
    bisect the last move's p_g so the result lands just past the target; then lower every p_g to the
    least value that gives the same masks (a group held by the floor or by votes reports p_g = 0)

so each step removes the least normalised |gamma| (or magnitude) mass per parameter / MAC saved. The
result is a plain {group: p_g} table: the explicit mode with those ratios gives the same masks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from compress.prune.graph import Analysis, Unit
from compress.prune.masks import Decider


def _dim_size(target: nn.Module | nn.Parameter, dim: str, pruning_dim: int = -1) -> int:
    if isinstance(target, nn.Parameter):
        return int(target.shape[pruning_dim])
    if isinstance(target, nn.modules.conv._ConvNd):
        return target.out_channels if dim == "out" else target.in_channels
    if isinstance(target, nn.Linear):
        return target.out_features if dim == "out" else target.in_features
    for attr in ("num_features", "num_channels", "num_parameters", "embedding_dim", "embed_dim", "hidden_size"):
        if isinstance(getattr(target, attr, None), int):
            return int(getattr(target, attr))
    if isinstance(target, nn.LayerNorm):
        return int(target.normalized_shape[-1])
    raise ValueError(f"cannot size {type(target).__name__}")


@dataclass
class _Term:
    """params / MACs of one module: parts that scale with the kept share of its out axis, or of both axes."""

    module: int
    params_out: float  # tensors cut along the out axis only (biases, norms, depthwise weights)
    params_both: float  # weights cut along both axes
    macs_out: float
    macs_both: float


class CostModel:
    """Parameters and MACs of the model under unit masks, updated incrementally per unit."""

    def __init__(self, analysis: Analysis, units: list[Unit]) -> None:
        model = analysis.model
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self.total_params = float(sum(p.numel() for p in model.parameters()))
        index: dict[str, int] = {}
        sizes: list[tuple[int, int]] = []
        terms: list[_Term] = []
        self.unit_members: list[list[tuple[int, int, np.ndarray]]] = []
        for unit in units:
            entries = []
            for m in unit.members:
                if m.module not in index:
                    target = modules.get(m.module, params.get(m.module))
                    if target is None:
                        continue
                    index[m.module] = len(sizes)
                    node = analysis.graph.module2node.get(target)
                    pdim = node.pruning_dim if node is not None else -1
                    sizes.append((_dim_size(target, "out", pdim), _dim_size(target, "in", pdim)))
                    terms.append(self._term(len(terms), target, analysis.layers.get(m.module)))
                entries.append((index[m.module], 0 if m.dim == "out" else 1, m.counts(unit.size)))
            self.unit_members.append(entries)
        self.sizes = np.array(sizes, dtype=np.float64).reshape(-1, 2)
        self.terms = terms
        self.removed = np.zeros_like(self.sizes)  # [modules, (out, in)] channels removed
        self.full_macs = analytic_macs(analysis)
        self._module_cost = np.array([self._cost(i) for i in range(len(terms))]).reshape(-1, 2)
        self.params = self.total_params
        self.macs = self.full_macs
        self.keeps: list[np.ndarray | None] = [None] * len(units)

    @staticmethod
    def _term(i: int, target: nn.Module | nn.Parameter, info) -> _Term:
        positions = float(info.positions) if info is not None else 0.0
        if isinstance(target, nn.Parameter):
            return _Term(i, float(target.numel()), 0.0, 0.0, 0.0)
        own = {n: p.numel() for n, p in target.named_parameters(recurse=False)}
        weight = float(own.pop("weight", 0))
        rest = float(sum(own.values()))
        if isinstance(target, nn.modules.conv._ConvNd):
            if target.groups == target.out_channels and target.out_channels > 1:  # depthwise: in follows out
                return _Term(i, weight + rest, 0.0, weight * positions, 0.0)
            return _Term(i, rest, weight, 0.0, weight * positions)
        if isinstance(target, nn.Linear):
            return _Term(i, rest, weight, 0.0, weight * positions)
        return _Term(i, weight + rest, 0.0, 0.0, 0.0)

    def _cost(self, i: int) -> tuple[float, float]:
        out_n, in_n = self.sizes[i]
        r_out = 1.0 - self.removed[i, 0] / max(out_n, 1.0)
        r_in = 1.0 - self.removed[i, 1] / max(in_n, 1.0)
        t = self.terms[i]
        return (t.params_out * r_out + t.params_both * r_out * r_in,
                t.macs_out * r_out + t.macs_both * r_out * r_in)

    def set_unit(self, u: int, keep: np.ndarray) -> None:
        """Apply unit `u`'s mask (bool [size]); params / macs are updated."""
        old = self.keeps[u]
        if old is not None and np.array_equal(old, keep):
            return
        touched = set()
        for module, dim, counts in self.unit_members[u]:
            before = 0.0 if old is None else float(counts[~old].sum())
            self.removed[module, dim] += float(counts[~keep].sum()) - before
            touched.add(module)
        for module in touched:
            new = self._cost(module)
            self.params += new[0] - self._module_cost[module, 0]
            self.macs += new[1] - self._module_cost[module, 1]
            self._module_cost[module] = new
        self.keeps[u] = keep

    def removed_share(self, metric: str) -> float:
        if metric == "params":
            return 1.0 - self.params / self.total_params
        return 1.0 - self.macs / max(self.full_macs, 1.0)


def analytic_macs(analysis: Analysis) -> float:
    """Conv / linear MACs of one image (weight size x output positions), as the cost model counts them."""
    total = 0.0
    for name, module in analysis.model.named_modules():
        info = analysis.layers.get(name)
        if info is not None and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            total += float(module.weight.numel()) * info.positions
    return total


def search_ratios(decider: Decider, cost: CostModel, targets: Mapping[str, float], step: float = 0.05,
                  max_ratio: float = 0.98, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Greedy per-group ratios removing at least `targets[m]` of each metric m ("params", "macs"); see the
    module doc. With two targets, a move's gain is the sum over the unmet ones of gain / target."""
    ratios = {g: 0.0 for g in decider.groups}
    thresholds = decider.thresholds(ratios)
    keeps = [decider.decide(i, thresholds) for i in range(len(decider.units))]
    for i, keep in enumerate(keeps):
        cost.set_unit(i, keep)
    members = {g: [i for i, gs in enumerate(decider.unit_groups) if g in gs] for g in decider.groups}

    def shares() -> dict[str, float]:
        return {m: cost.removed_share(m) for m in targets}

    def met(values: Mapping[str, float]) -> bool:
        return all(values[m] >= t for m, t in targets.items())

    def trial(group: str, p: float) -> tuple[dict[str, float], float, dict[int, np.ndarray]]:
        """Shares after setting p_group = p, the importance it removes, the units it changes (state kept)."""
        th = decider.thresholds({**ratios, group: p})
        changed, mass = {}, 0.0
        for i in members[group]:
            keep = decider.decide(i, th)
            if not np.array_equal(keep, keeps[i]):
                changed[i] = keep
                mass += float(decider.importance[i][keeps[i] & ~keep].sum()
                              - decider.importance[i][~keeps[i] & keep].sum())
        for i, keep in changed.items():
            cost.set_unit(i, keep)
        after = shares()
        for i in changed:
            cost.set_unit(i, keeps[i])
        return after, mass, changed

    def accept(group: str, p: float, changed: dict[int, np.ndarray]) -> None:
        ratios[group] = p
        for i, keep in changed.items():
            keeps[i] = keep
            cost.set_unit(i, keep)

    last: tuple[str, float] | None = None
    while not met(now := shares()):
        best = free = None
        for g in decider.groups:
            if ratios[g] >= max_ratio:
                continue
            p = min(max_ratio, ratios[g] + step)
            after, mass, changed = trial(g, p)
            gain = sum((after[m] - now[m]) / t for m, t in targets.items() if now[m] < t)
            if gain > 1e-12:
                score = max(mass, 0.0) / gain
                if best is None or score < best[0]:
                    best = (score, g, p, changed)
            elif changed and (free is None or mass < free[0]):
                free = (mass, g, p, changed)
            elif free is None:
                free = (np.inf, g, p, changed)
        move = best if best is not None else free
        if move is None:
            if log:
                log(f"prune: WARNING every group is at p = {max_ratio}; removed "
                    + ", ".join(f"{v:.3f} of {m}" for m, v in now.items()) + f", short of the target {dict(targets)}")
            break
        _, g, p, changed = move
        last = (g, ratios[g])
        accept(g, p, changed)
    if last is not None and met(shares()):  # bisect the last move to land just past the target
        g, low = last
        high = ratios[g]
        for _ in range(8):
            mid = (low + high) / 2
            if met(trial(g, mid)[0]):
                high = mid
            else:
                low = mid
        if high != ratios[g]:
            accept(g, high, trial(g, high)[2])
    for g in decider.groups:  # report the least p_g that gives the same masks (floors and votes can make
        low, high = 0.0, ratios[g]  # higher values of a group change nothing), as a short number if possible
        if high == 0.0:
            continue
        if not trial(g, 0.0)[2]:
            ratios[g] = 0.0
            continue
        for _ in range(10):
            mid = (low + high) / 2
            if trial(g, mid)[2]:
                low = mid
            else:
                high = mid
        short = math.ceil(high * 1e4) / 1e4
        ratios[g] = short if short <= ratios[g] and not trial(g, short)[2] else high
    return ratios
