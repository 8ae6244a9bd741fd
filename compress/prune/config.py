"""Recipe sections of the prune stage (and the scope fields the sparse stage shares with it)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compress.prune.groups import compile_pattern
from compress.config import Config


class ScopeConfig(Config):
    """Which layers are prunable and how they are grouped. `sparse` and `prune` must agree on these."""

    groups: Literal["auto"] | dict[str, list[str]] = Field(
        "auto", description="'auto' (stride x module family, see `compress inspect --groups`) or "
                            "{group name: [module-name patterns]}; a pattern is an fnmatch glob or 're:REGEX'")
    family_depth: int = Field(2, ge=1, le=4, description="module-path names kept in the automatic family "
                                                         "(1: backbone / neck / head; 2: neck.td / neck.bu ...)")
    ignore: list[str] = Field(default_factory=list,
                              description="patterns of layers whose output channels must stay (glob or 're:')")
    protect_outputs: bool = Field(True, description="keep the out channels of layers that feed the model output "
                                                    "(classifier, detection head outputs)")

    @field_validator("ignore")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            compile_pattern(pattern)
        return value

    @field_validator("groups")
    @classmethod
    def _group_patterns_compile(cls, value):
        if isinstance(value, dict):
            for name, patterns in value.items():
                if not patterns:
                    raise ValueError(f"group '{name}' has no patterns")
                for pattern in patterns:
                    compile_pattern(pattern)
        return value


class PruneConfig(ScopeConfig):
    """Group channel pruning: per-group |gamma| quantile thresholds, coupled-mask voting, physical removal."""

    method: Literal["group", "uniform"] = Field(
        "group", description="group: per-group |gamma| thresholds (ours); uniform: the baseline, torch-pruning's "
                             "uniform magnitude pruning (same share of every unit, L2 weight norm; needs target)")
    ratios: dict[str, float] | None = Field(
        None, description="explicit p_g per group: {group or glob: share of its channels under the threshold}; "
                          "groups no key matches are not pruned")
    target: dict[Literal["params", "macs"], float] | None = Field(
        None, description="share to remove, e.g. {params: 0.6}, {macs: 0.4} or both (both must be met); "
                          "the p_g are searched")
    importance: Literal["bn", "data"] = Field(
        "bn", description="bn: |gamma| of each channel's BatchNorm (magnitude where there is none), what sparse "
                          "training shapes; data: the share of its readers' output variance a channel carries, "
                          "measured on `importance_samples` images of the calib data (for pretrained models)")
    importance_samples: int = Field(64, ge=1, description="calibration images the data importance reads")
    correct_bn: bool = Field(True, description="with importance 'data': shift the BatchNorm statistics by what the "
                                               "removed channels carried (measured on the same images), keeping "
                                               "the model's own population statistics")
    vote: Literal["majority", "union", "intersection"] = Field(
        "majority", description="coupled channels: keep if at least half (majority), any (union) or all "
                                "(intersection) of the coupled masks keep it")
    floor_share: float = Field(0.01, ge=0, lt=1, description="each layer keeps at least int(floor_share * C) channels")
    floor_min: int = Field(16, ge=1, description="... or min(floor_min, C) when int(floor_share * C) is 0")
    fold: bool = Field(True, description="fold the constant act(beta) of removed channels into the next layer")
    verify: bool = Field(True, description="check the pruned model against a masked copy of the original")
    search_step: float = Field(0.05, gt=0, le=0.5, description="increment of p_g per greedy search move")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for group, p in (value or {}).items():
            compile_pattern(group)
            if not 0 <= p < 1:
                raise ValueError(f"ratio of group '{group}' must be in [0, 1), got {p}")
        return value

    @field_validator("target")
    @classmethod
    def _one_target(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("target needs params and/or macs, e.g. {params: 0.6}")
            for key, share in value.items():
                if not 0 < share < 1:
                    raise ValueError(f"target {key} is the share to remove, in (0, 1); got {share}")
        return value

    @model_validator(mode="after")
    def _ratios_or_target(self) -> PruneConfig:
        if self.method == "uniform" and self.target is None:
            raise ValueError("method 'uniform' needs a target ({params: S} or {macs: S})")
        if (self.ratios is None) == (self.target is None):
            raise ValueError("give either ratios (explicit p_g per group) or target ({params: S} or {macs: S}), "
                             "not both or neither")
        return self
