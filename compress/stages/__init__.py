"""Recipe stages: thin glue between a run (`RunContext`) and the algorithm libraries.

The built-in stages are listed here explicitly; `register_stage` adds a user's own (plug-ins). Each stage
module defines `STAGE` (or several specs) and imports libraries (`compress.sparse`, `prune`, `distill`,
`quant`, `format`), never another stage or the runner.
"""
from __future__ import annotations

from compress.stages import distill, export, finetune, prune, quantize, recover, sparse
from compress.stages.spec import STAGES, StageFn, StageSpec, register_stage

BUILTIN_STAGES: tuple[StageSpec, ...] = (finetune.FINETUNE, finetune.EVALUATE, sparse.STAGE, prune.STAGE,
                                         distill.STAGE, quantize.STAGE, export.STAGE, recover.STAGE)
for _spec in BUILTIN_STAGES:
    STAGES.add(_spec.name, _spec)

__all__ = ["STAGES", "BUILTIN_STAGES", "StageFn", "StageSpec", "register_stage"]
