"""Group channel pruning (Chu et al. 2022) that physically shrinks a model; see docs/PRUNING.md.

A library: the recipe stage is `compress.stages.prune`; the shape manifest and its restorer live on the read
side (`compress.format.prune_manifest`, `compress.format.restorers`).
"""
from compress.prune.config import PruneConfig, ScopeConfig
from compress.prune.core import PruneResult, analyze_scope, describe_groups, prune_model
from compress.prune.graph import Analysis, Unit, analyze
from compress.format.prune_manifest import apply_manifest, make_manifest, snapshot
from compress.errors import PruneError

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
