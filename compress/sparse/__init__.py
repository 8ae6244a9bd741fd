"""Dynamic sparse training (Chu et al. 2022): L1 on BN scales with a rate that changes over training.

Importing this package registers the `sparse` stage.
"""
from compress.sparse.hook import SparseHook
from compress.sparse.schedule import l1_rates, l1_subgradient
from compress.sparse.stage import SparseConfig
from compress.sparse import stage as _stage  # noqa: F401  (registers the stage)

__all__ = ["SparseConfig", "SparseHook", "l1_rates", "l1_subgradient"]
