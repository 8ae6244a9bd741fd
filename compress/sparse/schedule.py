"""The L1 rate of every prunable BN channel at a point of training (dynamic sparse training, Chu et al. 2022).

    constant: every channel gets `rate`
    dynamic:  before `switch_at` of training, every channel gets `rate`; after it, the `protected_share` of
              channels with the largest |gamma| (ranked over all prunable BNs together, re-ranked at every
              step) get `rate * protected_factor`, the rest keep `rate`

Defaults (METHODS.md, from the authors' code): rate 1e-3, switch at 40 % of training, 35 % protected,
factor 0.01. Progress is measured in optimiser steps (step / total steps), the finest form of "40 % of
the epochs".
"""
from __future__ import annotations

import torch

SCHEDULES = ("dynamic", "constant")


def l1_rates(abs_gamma: torch.Tensor, progress: float, rate: float = 1e-3, schedule: str = "dynamic",
             switch_at: float = 0.4, protected_share: float = 0.35, protected_factor: float = 0.01) -> torch.Tensor:
    """Per-channel L1 rates: float [N] for |gamma| float [N] at `progress` in [0, 1]."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {SCHEDULES}")
    rates = torch.full_like(abs_gamma, rate)
    if schedule == "dynamic" and progress >= switch_at:
        k = int(protected_share * abs_gamma.numel())
        if k > 0:
            top = torch.topk(abs_gamma, k, sorted=False).indices
            rates[top] = rate * protected_factor
    return rates


def l1_subgradient(gamma: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """The L1 term's sub-gradient `rates * sign(gamma)` (0 where gamma == 0): float [N]."""
    return rates * torch.sign(gamma)
