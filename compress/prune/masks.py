"""From per-group ratios p_g to keep masks: thresholds, coupled-mask voting, ties, chunk balance, floor.

Pure array functions (numpy, small and called thousands of times by the search) plus `Decider`, which
holds the precomputed scores of one analysed model.

Per group g (and per score kind: |gamma| and the magnitude fallback never share a quantile):
    theta_g = quantile(scores of g, p_g)          keep a carrier's channel iff score > theta_g
which, for distinct scores, removes the k = floor((n - 1) p_g) + 1 lowest of the group's n scores. Scores
that tie (random init: every |gamma| is 1) would all fall together, so the rule is applied as a rank: the k
lowest-ranked scores go, ties ranked by the channel's relative position in its layer, then by layer, which
spreads a tied group's removals evenly over its layers and gives the ratio asked whatever the ties.
Per unit (coupled channels), for every element e (a root channel, or a head):
    keep[e] = vote over the carriers that score e   (majority: >= half keep; union; intersection)
then the constraints, in this order:
    ties     elements of one tie class (same position in each group of a grouped conv) vote together
    balance  the parts of a `chunk` keep the same count: round(mean kept per part), best first
    floor    at least floor_count(size) elements (and always 1), best first; attention heads: at least
             max(1, int(floor_share * heads))
"Best" is the element's importance: the mean over its carriers of score / mean score of the carrier's
group (unitless, comparable across groups).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import math

import numpy as np

from compress.prune.graph import Unit

VOTES = ("majority", "union", "intersection")


def floor_count(channels: int, share: float = 0.01, minimum: int = 16) -> int:
    """Fewest channels a layer keeps: int(share * C), or min(minimum, C) when that is 0 (METHODS.md)."""
    n = int(share * channels)
    return max(1, n if n > 0 else min(minimum, channels))


def quantile_threshold(scores: np.ndarray, p: float) -> float:
    """theta = the p-quantile of `scores` (float [n]); p <= 0 keeps everything (theta = -inf)."""
    if p <= 0 or len(scores) == 0:
        return -np.inf
    if p >= 1:
        return np.inf
    return float(np.quantile(scores, p))


def removal_count(n: int, p: float) -> int:
    """How many of n scores the p-quantile threshold removes when they are distinct (see the module doc)."""
    if p <= 0 or n == 0:
        return 0
    if p >= 1:
        return n
    return min(n, int(math.floor((n - 1) * p)) + 1)


def vote(kept: np.ndarray, covered: np.ndarray, mode: str = "majority") -> np.ndarray:
    """Decide elements from the votes of coupled masks.

    kept, covered: int [n] -- how many carriers keep / score each element. Elements nobody scores are kept.
    """
    if mode == "majority":
        keep = 2 * kept >= covered
    elif mode == "union":
        keep = kept > 0
    elif mode == "intersection":
        keep = kept == covered
    else:
        raise ValueError(f"vote mode {mode!r}: expected one of {VOTES}")
    return keep | (covered == 0)


def top_k(importance: np.ndarray, k: int) -> np.ndarray:
    """bool [n]: the k most important elements (stable order on ties)."""
    keep = np.zeros(len(importance), dtype=bool)
    if k > 0:
        keep[np.argsort(-importance, kind="stable")[:k]] = True
    return keep


def apply_ties(keep_votes: tuple[np.ndarray, np.ndarray], classes: np.ndarray, mode: str) -> np.ndarray:
    """Vote per tie class (summing the votes of its elements) and give every element its class's fate."""
    kept, covered = keep_votes
    n_classes = int(classes.max()) + 1
    class_keep = vote(np.bincount(classes, kept, n_classes), np.bincount(classes, covered, n_classes), mode)
    return class_keep[classes]


def apply_balance(keep: np.ndarray, parts: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Make the parts of a chunk (int [parts, part_size] of elements) keep equal counts."""
    keep = keep.copy()
    k = max(1, int(np.round(keep[parts].sum(axis=1).mean())))
    for part in parts:
        keep[part] = top_k(importance[part], k)
    return keep


def apply_floor(keep: np.ndarray, importance: np.ndarray, minimum: int, classes: np.ndarray | None = None,
                balance: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Add back the most important elements until at least `minimum` are kept (whole classes / parts)."""
    if keep.sum() >= minimum:
        return keep
    keep = keep.copy()
    if classes is not None:
        n_classes = int(classes.max()) + 1
        sizes = np.bincount(classes, minlength=n_classes)
        class_imp = np.bincount(classes, importance, n_classes) / np.maximum(sizes, 1)
        class_keep = np.bincount(classes, keep, n_classes) > 0
        for c in np.argsort(-class_imp, kind="stable"):
            if keep.sum() >= minimum:
                break
            if not class_keep[c]:
                class_keep[c] = True
                keep[classes == c] = True
        return keep
    if balance:
        for parts in balance:
            k = -(-minimum // parts.shape[0])
            for part in parts:
                if keep[part].sum() < k:
                    keep[part] = keep[part] | top_k(importance[part], k)
        if keep.sum() >= minimum:
            return keep
    return keep | top_k(importance, minimum)


class Decider:
    """Turns per-group ratios into keep masks for the prunable units of one analysis."""

    def __init__(self, units: Sequence[Unit], mode: str = "majority", floor_share: float = 0.01,
                 floor_min: int = 16) -> None:
        if mode not in VOTES:
            raise ValueError(f"vote mode {mode!r}: expected one of {VOTES}")
        self.units = list(units)
        self.mode = mode
        # heads are few and large: the channel floor (16) would keep them all, so heads only keep >= 1
        self.floors = [floor_count(u.size, floor_share, floor_min) if u.kind == "channels"
                       else max(1, int(floor_share * u.size)) for u in self.units]
        pools: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for u, unit in enumerate(self.units):
            for j, c in enumerate(unit.carriers):
                pools.setdefault((c.group, c.pool), []).append((u, j))
        self.scores = {key: np.sort(np.concatenate([self.units[u].carriers[j].score for u, j in members]))
                       for key, members in pools.items()}
        self.means = {key: max(float(v.mean()), 1e-12) for key, v in self.scores.items()}
        # data scores are shares of the readers' output: comparable across groups as they are, so every data pool
        # is divided by one common mean (|gamma| and magnitudes are relative to their own group's mean)
        data = [v for key, v in self.scores.items() if key[1] == "data"]
        if data:
            common = max(float(np.concatenate(data).mean()), 1e-12)
            self.means.update({key: common for key in self.scores if key[1] == "data"})
        # rank of every carrier score within its (group, kind) pool: score, then relative position, then layer
        self.ranks: dict[tuple[int, int], np.ndarray] = {}
        for members in pools.values():
            score = np.concatenate([self.units[u].carriers[j].score for u, j in members])
            size = [len(self.units[u].carriers[j].score) for u, j in members]
            position = np.concatenate([np.arange(n) / max(n, 1) for n in size])
            layer = np.repeat(np.arange(len(members)), size)
            rank = np.empty(len(score), dtype=np.int64)
            rank[np.lexsort((layer, position, score))] = np.arange(len(score))
            for (u, j), part in zip(members, np.split(rank, np.cumsum(size)[:-1])):
                self.ranks[(u, j)] = part
        self.groups = sorted({key[0] for key in self.scores})
        self.unit_groups = [sorted({c.group for c in u.carriers}) for u in self.units]
        # the unit elements each cut layer holds: a layer that holds only some of them (a concat's input, a
        # chunk's part) must keep at least one, or removing the unit would empty it
        self.covers = [[np.unique(m.root) for m in u.members if len(m.root) and len(np.unique(m.root)) < u.size]
                       for u in self.units]
        self.importance = []
        for unit in self.units:
            total = np.zeros(unit.size)
            count = np.zeros(unit.size)
            for c in unit.carriers:
                total[c.roots] += c.score / self.means[(c.group, c.pool)]
                count[c.roots] += 1
            self.importance.append(total / np.maximum(count, 1))

    def thresholds(self, ratios: Mapping[str, float]) -> dict[tuple[str, str], int]:
        """Per (group, kind): how many of the pool's lowest-ranked scores the ratios remove."""
        return {key: removal_count(len(s), ratios.get(key[0], 0.0)) for key, s in self.scores.items()}

    def decide(self, index: int, thresholds: Mapping[tuple[str, str], int]) -> np.ndarray:
        """bool [size]: the elements unit `index` keeps under these thresholds (removal counts)."""
        unit = self.units[index]
        kept = np.zeros(unit.size, dtype=np.int64)
        covered = np.zeros(unit.size, dtype=np.int64)
        for j, c in enumerate(unit.carriers):
            kept[c.roots] += self.ranks[(index, j)] >= thresholds[(c.group, c.pool)]
            covered[c.roots] += 1
        importance = self.importance[index]
        if unit.ties is not None:
            keep = apply_ties((kept, covered), unit.ties, self.mode)
        else:
            keep = vote(kept, covered, self.mode)
        for parts in unit.balance:
            keep = apply_balance(keep, parts, importance)
        keep = apply_floor(keep, importance, self.floors[index], unit.ties, unit.balance)
        for covered in self.covers[index]:
            if not keep[covered].any():
                best = covered[np.argmax(importance[covered])]
                keep = keep.copy()
                keep[unit.ties == unit.ties[best] if unit.ties is not None else best] = True
        return keep

    def decide_all(self, ratios: Mapping[str, float]) -> list[np.ndarray]:
        thresholds = self.thresholds(ratios)
        return [self.decide(i, thresholds) for i in range(len(self.units))]
