"""Group channel pruning (Chu et al. 2022) that physically shrinks a model; see docs/PRUNING.md.

Importing this package registers the `prune` stage and the `prune` checkpoint restorer.
"""
from compress.prune.config import PruneConfig, ScopeConfig
from compress.prune.core import PruneResult, analyze_scope, describe_groups, prune_model
from compress.prune.graph import Analysis, Unit, analyze
from compress.prune.manifest import apply_manifest, make_manifest, snapshot
from compress.prune.trace import PruneError
from compress.prune import stage as _stage  # noqa: F401  (registers the stage and the restorer)

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
