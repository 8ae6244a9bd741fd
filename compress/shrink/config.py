"""What `compress shrink` is asked to do, validated before any model is built."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from compress.config import Config, format_validation_error
from compress.errors import UserError

DEFAULT_RECOVER_STEPS = 100  # the CLI default too (compress shrink --recover-steps)
# jlcm options a shrink uses unless quant_options says otherwise. A shrink calibrates on a few images, so each
# layer's fit gets a stronger ridge toward the float weights than a recipe's (JLCMConfig.damp 0.01, where the
# calibration images are the training data): chosen on photo folds that never read photos:val
# (tools/bench_real.py --fold, docs/BENCHMARKS.md "Real pretrained model"). A few images also leave a classifier
# fed one pooled vector per image with fewer calibration rows than inputs: its fit is underdetermined, so the
# allocation gives it at least the target rounded down minus one bit (underdetermined_margin; same folds at 3 and
# 4 bits; rounded down, not up, after photos:val showed the 2-bit floor losing at 2.5 bits: docs/BENCHMARKS.md),
# and learns for fewer steps in proportion (scale_underdetermined_steps: MobileNetV2's classifier, 128 rows for 1,280
# inputs, learns 20 steps instead of 200, for a tenth of its ~30 s; chosen on the same folds). min_bits 2 (no 1-bit
# layers) won on the folds at 2.5 and 3 bits but lost 5-11 points at 2.5 bits on photos:val, so it is not set here
# (docs/BENCHMARKS.md, "Session 14").
SHRINK_JLCM_DEFAULTS: dict[str, Any] = {"damp": 1.0, "underdetermined_margin": 1, "scale_underdetermined_steps": True}


class ShrinkConfig(Config):
    """One checkpoint -> one artifact: prune (optional), label-free recovery, quantization."""

    model: str = Field(description="builder spec: compress:NAME, timm:NAME, torchvision:NAME, file:path.py:fn")
    checkpoint: str | None = Field(None, description="safetensors or weights-only torch file; None: random init")
    num_classes: int = Field(gt=0)
    task: Literal["classification", "detection"] = "classification"
    prune: float = Field(0.0, description="share of parameters to remove, in [0, 1)")
    bits: float | None = Field(3.0, description="jlcm: average bits per weight; rtn/kmeans/nf4: index bits")
    method: str = "jlcm"
    calib: str = Field("digits", description="a data source (its calib split, or SOURCE:SPLIT) or a folder")
    calib_samples: int = 64
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    recover: bool = Field(False, description="after pruning: re-estimate BatchNorm statistics and distill from the "
                                            "unpruned model on the calibration images (off: on a pretrained model "
                                            "and a few photos it lost more than it regained, docs/BENCHMARKS.md)")
    recover_steps: int = Field(DEFAULT_RECOVER_STEPS, ge=0)
    prune_importance: Literal["data", "bn"] = Field(
        "data", description="data: channels scored on the calibration images by the share of their readers' output "
                            "they carry; bn: |gamma| (magnitude without BN), for sparse-trained models")
    batch_size: int = Field(16, gt=0)
    seed: int = 0
    quant_options: dict[str, Any] = Field(default_factory=dict, description="more options of the method")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _none_means_random_init(cls, value: Any) -> Any:
        return None if value is None or str(value).lower() == "none" else str(value)

    @field_validator("task", mode="before")
    @classmethod
    def _known_task(cls, value: Any) -> Any:
        if value not in ("classification", "detection"):
            raise ValueError(f"--task {value!r}: write classification or detection")
        return value

    @field_validator("prune")
    @classmethod
    def _prune_share(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"--prune {value}: the share of parameters to remove must be in [0, 1)")
        return value

    @field_validator("calib_samples")
    @classmethod
    def _positive_samples(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"--calib-samples must be > 0 (got {value})")
        return value

    @classmethod
    def from_options(cls, **options: Any) -> ShrinkConfig:
        """Validate keyword options; a bad one raises one UserError naming it."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise UserError(format_validation_error(exc, prefix="shrink")) from None
