"""Group channel pruning (Chu et al. 2022) that physically shrinks a model; see docs/PRUNING.md.

A library: the recipe stage is `compress.stages.prune`; the shape manifest and its restorer live on the read
side (`compress.format.prune_manifest`, `compress.format.restorers`).
"""
from importlib import import_module
from typing import Any

from compress.prune.config import PruneConfig, ScopeConfig
from compress.format.prune_manifest import apply_manifest, make_manifest, snapshot
from compress.errors import PruneError

# imported on first use: they bring torch-pruning (with timm and torchvision), seconds that reading a recipe's
# pruning options need not wait for
_LAZY = {"PruneResult": "core", "analyze_scope": "core", "describe_groups": "core", "prune_model": "core",
         "Analysis": "graph", "Unit": "graph", "analyze": "graph"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"compress.prune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compress.prune' has no attribute '{name}'")

__all__ = [
    "PruneConfig",
    "ScopeConfig",
    "PruneResult",
    "PruneError",
    "Analysis",
    "Unit",
    "analyze",
    "analyze_scope",
    "apply_manifest",
    "describe_groups",
    "make_manifest",
    "prune_model",
    "snapshot",
]
