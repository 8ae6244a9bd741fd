"""Dynamic sparse training (Chu et al. 2022): L1 on BN scales with a rate that changes over training.

A library: the recipe stage that trains with it is `compress.stages.sparse`.
"""
from compress.sparse.hook import SparseHook
from compress.sparse.schedule import l1_rates, l1_subgradient

__all__ = ["SparseHook", "l1_rates", "l1_subgradient"]
