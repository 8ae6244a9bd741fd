"""The recipe schema: a YAML file validated into frozen pydantic objects before any work starts."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.config import Config, format_validation_error
from compress.errors import RecipeError, unknown_choice

MAX_RECIPE_BYTES = 1_000_000


class ModelConfig(Config):
    build: str = Field(description="builder spec: compress:NAME, timm:NAME, torchvision:NAME, file:path.py:fn")
    num_classes: int = Field(gt=0, le=100_000, description="classes of the task (torchvision detectors: + background)")
    checkpoint: str | None = Field(None, description="safetensors or weights-only torch file to start from")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the builder")


class DataRef(Config):
    source: str = Field(description="registered data source: digits, digits-detect, folder, coco, yolo, voc")
    split: Literal["train", "val", "calib"]
    root: str | None = Field(None, description="folder or file for file-based sources")
    skip: int = Field(0, ge=0, description="leave out the first N items of the split (carve a tuning split out of "
                      "train: train skips N, the tuning split takes `samples: N`)")
    samples: int | None = Field(None, gt=0, description="use only the first N items of the split (after `skip`)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra options of the source")

    @model_validator(mode="after")
    def _known_source(self) -> DataRef:
        from calib.registry import list_sources, source_options

        if self.source not in list_sources():
            raise ValueError(unknown_choice("data source", self.source, list_sources()))
        for key in self.options:
            if key not in source_options(self.source):
                raise ValueError(f"source '{self.source}': {unknown_choice('option', key, source_options(self.source))}")
        return self


class DataConfig(Config):
    train: DataRef
    val: DataRef
    calib: DataRef | None = None


class TrainDefaults(Config):
    batch_size: int = Field(32, gt=0, description="per-process batch size of training stages")
    eval_batch_size: int = Field(64, gt=0)
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    threads: int | None = Field(None, ge=1, le=4096, description="torch CPU threads for the run; None: torch's default "
                                "(one per core). Figures depend on it a little (float summation order)")


class StageEntry(BaseModel):
    """One stage of a recipe: its registered name and its validated config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    config: Config


class Recipe(Config):
    name: str
    seed: int = 0
    model: ModelConfig
    task: Literal["classification", "detection"]
    image_size: int = Field(gt=0, le=8192, description="square input side used for training, MACs and export")
    data: DataConfig
    train: TrainDefaults = Field(default_factory=TrainDefaults)
    stages: list[StageEntry] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _parse_stages(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "stages" not in data:
            return data
        data = dict(data)
        data["stages"] = [_parse_stage(i, entry) for i, entry in enumerate(data["stages"] or [])]
        return data

    @model_validator(mode="after")
    def _cross_stage_checks(self) -> Recipe:
        names = [s.name for s in self.stages]
        scope = ("groups", "family_depth", "ignore", "protect_outputs")
        sparse = [(i, s.config) for i, s in enumerate(self.stages) if s.name == "sparse"]
        for i, stage in enumerate(self.stages):
            if stage.name == "prune":
                for j, config in sparse:
                    for key in scope:
                        if getattr(config, key) != getattr(stage.config, key):
                            raise ValueError(f"stages.{j}.sparse.{key} and stages.{i}.prune.{key} differ; the sparse "
                                             "stage must regularise the channels that prune will judge (use the same value)")
            if stage.name == "distill" and getattr(stage.config, "teacher", None) == "before-prune" \
                    and "prune" not in names[:i]:
                raise ValueError(f"stages.{i}.distill.teacher is 'before-prune' but no prune stage comes before it; "
                                 "add one or give a checkpoint path")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, in the YAML shape it was written in."""
        out = self.model_dump(mode="json", exclude={"stages"})
        out["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in self.stages]
        return out


def _parse_stage(index: int, entry: Any) -> StageEntry:
    from compress.stages import STAGES

    if isinstance(entry, StageEntry):
        return entry
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(
            f"stages.{index}: each stage is a mapping with one key, e.g. '- finetune: {{epochs: 3}}' (got {entry!r})"
        )
    (name, body), = entry.items()
    if name not in STAGES:
        raise RecipeError(f"stages.{index}: {unknown_choice('stage', name, STAGES)}")
    try:
        config = STAGES[name].config_cls.model_validate(body or {})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, prefix=f"stages.{index}.{name}")) from None
    return StageEntry(name=name, config=config)


def apply_overrides(data: dict[str, Any], overrides: list[str], flag: str = "--set",
                    example: str = "stages.0.finetune.epochs=3") -> dict[str, Any]:
    """Apply `a.b.0.c=value` overrides (value parsed as YAML) to raw recipe data (or to any dict of options; `flag`
    and `example` name the option they came from in errors)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise RecipeError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} {example}")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"{flag} {path}: '{where}' is not an index of a list of {len(node)} items")
                key = int(key)
            elif not isinstance(node, dict):
                raise RecipeError(f"{flag} {path}: '{'.'.join(keys[:depth])}' is a value, not a section")
            if last:
                from compress import safe_yaml

                try:
                    node[key] = safe_yaml.load(raw, f"{flag} {path}")
                except safe_yaml.YAMLInputError as exc:
                    raise RecipeError(str(exc)) from None
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def with_tuning_split(data: dict[str, Any], images: int) -> dict[str, Any]:
    """Raw recipe `data` section whose val is the first `images` train items and whose train skips them: a split to
    choose settings on, carved out of train, so that val is never used for choosing."""
    train = {key: value for key, value in data["train"].items() if key not in ("skip", "samples")}
    return {**data, "train": {**train, "skip": images}, "val": {**train, "samples": images}}


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate raw recipe data; every problem becomes one RecipeError naming the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with name, model, task, data, stages")
    data = dict(data)
    try:
        if isinstance(data.get("stages"), list):
            data["stages"] = [_parse_stage(i, entry) for i, entry in enumerate(data["stages"])]
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc)}") from None
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    from compress import safe_yaml

    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size:,} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES:,})")
    try:
        data = safe_yaml.load(path.read_bytes(), str(path))
    except safe_yaml.YAMLInputError as exc:
        raise RecipeError(str(exc)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, model, task, data, stages")
    return parse_recipe(apply_overrides(data, overrides or []), source=str(path))
