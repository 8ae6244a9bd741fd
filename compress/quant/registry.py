"""Quantization methods: a registry of (options config, weight quantizer), and the options shared by all."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from compress.errors import UserError
from compress.quant.stats import LayerStats
from compress.config import Config, format_validation_error
from compress.registry import Registry

__all__ = ["QuantConfig", "QuantMethod", "METHODS", "register_method", "get_method", "make_config", "Encoded"]

Encoded = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (layout, stored tensors), see formats.py
# fn(weight [R, ...] float, stats of the layer's inputs or None, bits of this layer, options) -> Encoded
QuantFn = Callable[[torch.Tensor, "LayerStats | None", int, "QuantConfig"], Encoded]


class QuantConfig(Config):
    """Options every method takes."""

    bits: float = Field(2.0, gt=0, le=8, description="uniform: the index bits of every layer (1-8); mixed: the "
                        "target average stored bits per quantized weight (indices, codebooks, scales and maps "
                        "counted; parameters that are never quantized, e.g. BatchNorm, do not count)")
    size_bytes: int | None = Field(None, gt=0, description="mixed only: target size of the model in bytes "
                                   "(parameters and buffers, as the size report counts), instead of bits")
    allocation: Literal["uniform", "mixed"] = Field("uniform", description="same bits for every layer, or per-layer "
                                                    "bits from a measured sensitivity to meet the target")
    bit_choices: tuple[int, ...] = Field((1, 2, 3, 4, 5, 6, 8), description="mixed: the bits a layer may get")
    estimated_bits: tuple[int, ...] = Field((5, 6), description="mixed: bit choices whose output error is not "
                                            "measured but scaled from the next measured width below by the ratio "
                                            "of their weights' squared errors (one forward per layer less each)")
    float_choice: bool = Field(False, description="mixed: a layer may also stay in float (charged 32 bits a weight, "
                               "twice what the artifact stores) when that is the best use of the bits, e.g. "
                               "a small layer that even 8 bits perturb (8 bits are then measured, not assumed lossless)")
    coded_indices: bool = Field(False, description="mixed: charge each layer's indices the entropy-coded size the "
                                "artifact stores them at (rANS, estimated from the data-free code) instead of their "
                                "fixed width, so the target counts the bits the file holds")
    replan: bool = Field(True, description="mixed: after each layer is quantized, re-solve the bits of the layers "
                         "left: the budget less what the quantized ones store, their planned sizes scaled by the ratio "
                         "of stored to planned bits so far (with coded_indices learned indices code to other sizes "
                         "than the data-free estimate; else nothing changes)")
    ignore: list[str] = Field(default_factory=list, description="layers kept dense: module names, globs "
                              "('head.*') or regexes with a 're:' prefix ('re:.*\\.fc\\d')")
    sensitivity_metric: Literal["mse", "kl"] = Field("mse", description="mixed: the output error a layer's "
                                                     "sensitivity is measured by: relative squared error of the "
                                                     "outputs, or KL of the softmax (classifiers' logits)")
    bn_views_steps: int = Field(0, ge=0, description="add to the calibration batches one view of each, moved this "
                                "many Adam steps toward the model's BatchNorm running statistics (the training data's "
                                "feature statistics; compress.quant.views): more views of few photos; 0: off")
    bn_views_lr: float = Field(0.05, gt=0, description="step size of those views, in units of their batch's std")
    sensitivity_samples: int = Field(16, gt=0, description="mixed: calibration inputs used to measure sensitivity")
    underdetermined_margin: int | None = Field(None, ge=0, le=8, description="mixed, bits target: a layer whose "
                                               "calibration rows are fewer than its inputs (an underdetermined fit, "
                                               "as a classifier fed one pooled vector per image) gets at least the "
                                               "target rounded down minus this many bits (None: no floor)")
    min_bits: int | None = Field(None, ge=1, le=8, description="mixed: every layer gets at least this many bits "
                                 "when the target allows it (else the plan without this floor; None: no floor)")
    pooled_prior: float = Field(0.0, ge=0, description="a linear layer with fewer calibration rows than inputs and "
                                "fed the spatial mean of a feature map (a classifier after global pooling) gets the "
                                "map's within-image second moment, scaled to this share of its input moment's trace, "
                                "as a prior (compress.quant.pooled; 0: none)")
    sensitivity_proxy: bool = Field(False, description="mixed: measure each layer's output error at one width only "
                                    "(the middle one) and scale it to the other widths by their weight error "
                                    "(one forward per layer instead of one per width; an approximation)")
    max_samples: int = Field(8192, gt=0, description="input rows per layer (tokens, or conv positions drawn at "
                             "random) used for the layer's statistics")
    sequential: bool = Field(True, description="take each layer's inputs from the model quantized so far (errors "
                             "of earlier layers are seen and corrected); False: from the float model, in one pass")
    window: int = Field(1, ge=1, description="sequential: layers whose inputs are caught in one pass of the model "
                        "quantized so far (more: fewer passes, but a window's layers miss each other's errors)")
    cache_mb: int = Field(256, ge=0, description="sequential: memory for the float model's inputs of upcoming "
                          "layers, caught in one pass (more: fewer float passes)")
    replay_mb: int = Field(512, ge=0, description="memory for recorded module outputs, per model copy, so that a "
                           "calibration pass only runs the model from where the last one stopped (0: off)")
    seed: int = Field(0, description="seed of the position sampling")
    bias_correction: int = Field(0, ge=0, description="passes of bias correction after quantizing (0: none): each "
                                 "quantized layer's mean output per channel is matched to the float model's on up to "
                                 "64 calibration inputs, through its bias or the next BatchNorm's running mean")
    fold_bn: bool = Field(False, description="fold each BatchNorm that follows a conv into the conv's weight before "
                          "quantizing (the BN stays, as a per-channel bias), so errors are measured after the BN")
    tune_steps: int = Field(0, ge=0, description="after quantizing, Adam steps that train every codebook and the "
                            "per-channel scales and biases together toward the float model's outputs on the "
                            "calibration inputs (mapping fixed; compress.quant.tune; 0: none)")
    tune_lr: float = Field(1e-3, gt=0, description="learning rate of the tuning steps (codebooks: in units of each "
                           "codebook's spread)")

    @model_validator(mode="after")
    def _check_allocation(self) -> QuantConfig:
        if self.allocation == "uniform":
            if self.size_bytes is not None:
                raise ValueError("size_bytes needs allocation: mixed (a size target is met by per-layer bits)")
            if self.bits != int(self.bits) or not 1 <= self.bits <= 8:
                raise ValueError(f"allocation uniform needs whole bits in 1..8 (got {self.bits}); use allocation: "
                                 "mixed for an average")
        if any(not 1 <= b <= 8 for b in self.bit_choices) or not self.bit_choices:
            raise ValueError(f"bit_choices must be bits in 1..8 (got {list(self.bit_choices)})")
        return self

    def needs_stats(self) -> bool:
        """Whether the method uses the layers' input statistics (else calibration data only plans bits)."""
        return False

    def quick(self) -> QuantConfig:
        """The options used to measure sensitivity: data-free and cheap, the same stored layout."""
        return self


@dataclass(frozen=True)
class QuantMethod:
    name: str
    config_cls: type[QuantConfig]
    fn: QuantFn
    # data-free encodings of one weight at several widths at once, {bits: encoded}, each what fn(weight, None,
    # bits, config) gives (optional: the sensitivity measurement calls fn per width without it)
    widths: Callable[[torch.Tensor, list[int], QuantConfig], dict[int, Encoded]] | None = None


METHODS: Registry[QuantMethod] = Registry("quantization method", error=UserError)


def register_method(name: str, config_cls: type[QuantConfig], widths: Callable[..., dict[int, Encoded]] | None = None
                    ) -> Callable[[QuantFn], QuantFn]:
    """Register `fn(weight, stats, bits, config) -> (layout, tensors)` as the method `name`; a duplicate raises.
    `widths(weight, bits_list, config)`: optional, the data-free encodings at several widths in one call."""

    return METHODS.register(name, lambda fn: QuantMethod(name, config_cls, fn, widths))


def get_method(name: str) -> QuantMethod:
    return METHODS.lookup(name)


def method_name(config: QuantConfig) -> str:
    """The registered method whose config class `config` is."""
    for name, spec in METHODS.items():
        if type(config) is spec.config_cls:
            return name
    raise UserError(f"{type(config).__name__} is not the config of a registered quantization method "
                    f"(known: {', '.join(METHODS.names())})")


def make_config(method: str, options: dict[str, Any]) -> QuantConfig:
    """Validate `options` for `method`; a bad or unknown key raises UserError naming it and the valid ones."""
    spec = get_method(method)
    try:
        return spec.config_cls.model_validate(options)
    except ValidationError as exc:
        raise UserError(f"quantize method '{method}': {format_validation_error(exc)}") from None
