"""What `compress sweep` is asked to do: one base shrink (checkpoint, model, calibration) and a grid of
(method, bits, prune) points, validated before anything runs."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from compress.config import Config, format_validation_error
from compress.errors import UserError
from compress.shrink.config import DEFAULT_RECOVER_STEPS, ShrinkConfig

BITS_RANGE = (1.0, 8.0)  # bits per weight a method can be asked for (jlcm: the average; others: whole bits)


def _one_line(exc: ValidationError) -> str:
    """`--bits: 9 is out of range ...`: pydantic's errors named by the command's options."""
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        where = str(err["loc"][0]).replace("_", "-") if err["loc"] else ""
        if where and where not in SweepConfig.model_fields and "field" in msg:
            parts.append(msg)
        else:
            parts.append(f"--{where}: {msg}" if where else msg)
    return "; ".join(parts) or format_validation_error(exc, prefix="sweep")


class SweepConfig(Config):
    """A grid of shrinks of one checkpoint, each point evaluated on a labelled split."""

    model: str = Field(description="builder spec: compress:NAME, timm:NAME, torchvision:NAME, file:path.py:fn")
    checkpoint: str | None = Field(None, description="safetensors or weights-only torch file; None: random init")
    num_classes: int = Field(gt=0)
    task: Literal["classification", "detection"] = "classification"
    bits: tuple[float, ...] = Field(description="jlcm: average bits per weight; rtn/kmeans/nf4: index bits")
    prune: tuple[float, ...] = (0.0,)
    methods: tuple[str, ...] = ("jlcm", "rtn", "kmeans", "nf4")
    calib: str = "digits"
    data: str = Field(description="the labelled evaluation split, SOURCE:SPLIT")
    calib_samples: int = Field(64, gt=0)
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    recover_steps: int = Field(DEFAULT_RECOVER_STEPS, ge=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    seed: int = 0
    tolerance: float = Field(1.0, ge=0, description="recommended point: the smallest within this many points "
                             "(percentage points of the metric) of the original")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _none_means_random_init(cls, value: Any) -> Any:
        return None if value is None or str(value).lower() == "none" else str(value)

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        lo, hi = BITS_RANGE
        bad = [b for b in value if not lo <= b <= hi]
        if bad:
            raise ValueError(f"{bad[0]:g} is out of range: bits per weight must be in [{lo:g}, {hi:g}]")
        return tuple(dict.fromkeys(value))

    @field_validator("prune")
    @classmethod
    def _prune(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [p for p in value if not 0 <= p < 1]
        if bad:
            raise ValueError(f"{bad[0]:g} is out of range: the share of parameters to remove must be in [0, 1)")
        return tuple(dict.fromkeys(value))

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from compress.quant.registry import METHODS
        from compress.registry import unknown_choice

        for name in value:
            if name not in METHODS:
                raise ValueError(unknown_choice("quantization method", name, METHODS))
        return tuple(dict.fromkeys(value))

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        from pathlib import Path

        if Path(value).expanduser().is_dir():
            return value  # refused with the reason (no labels) when the sweep starts
        source, sep, split = value.rpartition(":")
        if not sep or not source or not split:
            raise ValueError(f"{value!r}: write SOURCE:SPLIT, e.g. digits:val")
        return value

    @model_validator(mode="after")
    def _grid_not_empty(self) -> SweepConfig:
        for name in ("bits", "prune", "methods"):
            if not getattr(self, name):
                raise ValueError(f"empty grid: give at least one value of --{name}")
        if not any(status == "todo" for *_, status, _ in self.grid()):
            reasons = "; ".join(dict.fromkeys(reason for *_, reason in self.grid()))
            raise ValueError(f"empty grid: no (method, bits) pair can run ({reasons})")
        return self

    @classmethod
    def from_options(cls, **options: Any) -> SweepConfig:
        """Validate keyword options; a bad one raises one UserError naming it."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise UserError(_one_line(exc)) from None

    def grid(self) -> list[tuple[str, float, float, str, str]]:
        """Every point as (method, bits, prune, "todo" | "skipped", reason), prune outermost, then bits."""
        from compress.quant.registry import make_config

        points = []
        reasons: dict[tuple[str, float], str] = {}
        for method in self.methods:
            for bits in self.bits:
                try:
                    make_config(method, {"bits": bits})
                    reasons[method, bits] = ""
                except UserError as exc:
                    reasons[method, bits] = str(exc).removeprefix(f"quantize method '{method}': ").removeprefix("recipe: ")
        for prune in self.prune:
            for bits in self.bits:
                for method in self.methods:
                    reason = reasons[method, bits]
                    points.append((method, bits, prune, "skipped" if reason else "todo", reason))
        return points

    def shrink_config(self, method: str, bits: float, prune: float) -> ShrinkConfig:
        """The shrink of one point: the base settings with this method, bits and share pruned."""
        return ShrinkConfig(model=self.model, checkpoint=self.checkpoint, num_classes=self.num_classes, task=self.task,
                            prune=prune, bits=bits, method=method, calib=self.calib, calib_samples=self.calib_samples,
                            image_size=self.image_size, mean=self.mean, std=self.std, recover=True,
                            recover_steps=self.recover_steps, batch_size=self.batch_size, seed=self.seed)


def options_from_recipe(path: str) -> dict[str, Any]:
    """The base of a sweep taken from a recipe: model, classes, task, calibration (its calib split, else its
    train split) and the evaluation split (its val split)."""
    from compress.recipe import load_recipe

    recipe = load_recipe(path)

    def ref(which: str, data: Any) -> str:
        if data.root is not None:
            raise UserError(f"--recipe {path}: data.{which} reads files ({data.source} at {data.root}); give "
                            f"--{'data' if which == 'val' else 'calib'} instead")
        return f"{data.source}:{data.split}"

    calib = recipe.data.calib or recipe.data.train
    return {"model": recipe.model.build, "num_classes": recipe.model.num_classes, "task": recipe.task,
            "calib": ref("calib", calib), "data": ref("val", recipe.data.val)}
