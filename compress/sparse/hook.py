"""The training hook of the sparse stage: L1 sub-gradient on prunable BN scales, once per step."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from compress.sparse.schedule import l1_rates, l1_subgradient
from compress.tasks.base import unwrap
from compress.train import TrainHook

SMALL = 1e-2  # |gamma| below this counts as "pruned-looking" in the per-epoch log


class SparseHook(TrainHook):
    """Adds `rate_c * sign(gamma_c)` to the gradient of every prunable BN channel c.

    `after_backward` runs in `fit` after `accelerator.backward`, i.e. on gradients DDP has already
    averaged, so the term is added exactly once per step and identically on every replica (it is not part
    of the loss, so it is never averaged or scaled by the number of processes).
    """

    def __init__(self, channels: Mapping[str, np.ndarray], groups: Mapping[str, str], schedule: str = "dynamic",
                 rate: float = 1e-3, switch_at: float = 0.4, protected_share: float = 0.35,
                 protected_factor: float = 0.01) -> None:
        self.channels = {name: np.flatnonzero(mask) for name, mask in channels.items() if mask.any()}
        self.groups = dict(groups)
        self.schedule, self.rate, self.switch_at = schedule, rate, switch_at
        self.protected_share, self.protected_factor = protected_share, protected_factor
        self.total_steps = 1
        self.applied = 0  # steps on which the sub-gradient was added
        self.last_rates: torch.Tensor | None = None
        self._bns: list[tuple[str, nn.Module, torch.Tensor]] = []

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        modules = dict(unwrap(model).named_modules())
        missing = [name for name in self.channels if name not in modules]
        if missing:
            raise ValueError(f"sparse: BatchNorm layers {missing[:3]} are not in the model")
        self._bns = [(name, modules[name], torch.as_tensor(idx, device=modules[name].weight.device))
                     for name, idx in self.channels.items()]
        self.total_steps = max(1, total_steps)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        if not self._bns:
            return
        gammas = [bn.weight[idx] for _, bn, idx in self._bns]
        flat = torch.cat(gammas)
        rates = l1_rates(flat.abs(), step / self.total_steps, self.rate, self.schedule, self.switch_at,
                         self.protected_share, self.protected_factor)
        self.last_rates = rates
        sub = l1_subgradient(flat, rates).split([len(g) for g in gammas])
        for (_, bn, idx), term in zip(self._bns, sub):
            if bn.weight.grad is None:
                bn.weight.grad = torch.zeros_like(bn.weight)
            bn.weight.grad.index_add_(0, idx, term.to(bn.weight.grad.dtype))
        self.applied += 1

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Share of prunable channels with |gamma| < 1e-2, overall and per group."""
        small: dict[str, list[int]] = {}
        for name, bn, idx in self._bns:
            counts = small.setdefault(self.groups.get(name, "?"), [0, 0])
            counts[0] += int((bn.weight[idx].abs() < SMALL).sum())
            counts[1] += len(idx)
        total = [sum(c[0] for c in small.values()), sum(c[1] for c in small.values())]
        figures = {"small_gamma": total[0] / max(total[1], 1)}
        figures.update({f"small_gamma[{g}]": c[0] / max(c[1], 1) for g, c in sorted(small.items())})
        return figures
