"""The `quantize` stage: the quantization API fed by the recipe's calib split; the plan goes to the model meta."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn
from pydantic import Field, ValidationError, model_serializer, model_validator

from compress.format.checkpoint import atomic_write_json
from compress.format.restorers import QUANT_META_KEY as META_KEY
from compress.errors import unknown_choice
from compress.models.protocol import raw_outputs
from compress.quant.api import quantize
from compress.quant.sites import find_sites
from compress.quant.registry import METHODS, get_method
from compress.config import Config
from compress.stages.spec import StageSpec

if TYPE_CHECKING:
    from compress.pipeline import RunContext

__all__ = ["QuantizeStageConfig", "quantize_stage", "META_KEY", "STAGE"]

_STAGE_FIELDS = ("method", "batch_size")


class QuantizeStageConfig(Config):
    """`- quantize: {method: jlcm, bits: 2.0, groups: 8, calib_steps: 200}`: method, loader batch size, and
    the method's own options, written flat (validated against the method's config; see compress.quant)."""

    method: str = Field("jlcm", description="registered quantization method: jlcm, kmeans, rtn, nf4, ...")
    batch_size: int = Field(32, gt=0, description="calibration batch size")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options (written flat in a recipe)")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        # stage fields stay; every other key is an option of the method, validated by the method's config
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("method", "jlcm")
        if method not in METHODS:
            raise ValueError(unknown_choice("quantization method", method, METHODS))
        options = dict(data.pop("options", None) or {})
        options.update({k: data.pop(k) for k in list(data) if k not in _STAGE_FIELDS})
        known = (*_STAGE_FIELDS, *get_method(method).config_cls.model_fields)
        for key in options:
            if key not in known:
                raise ValueError(f"{unknown_choice('field', key, known)} of quantize method '{method}'")
        try:
            config = get_method(method).config_cls.model_validate(options)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
        data["options"] = config.model_dump(mode="json", exclude_unset=True)
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out.update(out.pop("options", {}) or {})
        return out


def quantize_stage(model: nn.Module, config: QuantizeStageConfig, ctx: RunContext) -> nn.Module:
    """Quantize with the calib split's images only; the plan goes to the checkpoint meta and the stage dir."""
    loader = ctx.task.loader(ctx.dataset("calib"), config.batch_size, shuffle=False)
    batches = [ctx.task.inputs(batch) for batch in loader]
    # one bar: a tick per BatchNorm-statistics view (bn_views_steps), per layer, then per codebook-tuning step
    views = 0
    if int(config.options.get("bn_views_steps", 0)) > 0:
        from compress.quant.views import viewable_batches

        views = len(viewable_batches(model, batches))
    total = views + _count_sites(model, config) + int(config.options.get("tune_steps", 0))
    with ctx.progress(f"quantize ({config.method})", total=total) as advance:
        def progress(event: dict[str, Any]) -> None:
            if event["phase"] == "quantize":
                info = {"bits": event["bits"]}
                if event.get("error") is not None:
                    info["err"] = event["error"]
                advance(**info)
            elif event["phase"] == "tune":
                advance(tune_loss=event["loss"])
            elif event["phase"] == "views":
                advance()

        with raw_outputs(model):  # torchvision detectors: calibrate on their raw head outputs
            model = quantize(model, batches, method=config.method, progress=progress, **config.options)
    plan = model.quantization_plan
    summary = plan["summary"]
    ctx.model_meta[META_KEY] = without_timings(plan)  # the checkpoint and artifact must not depend on run time
    # bits per quantized weight as the artifact stores them (indices entropy-coded): what a bits target counts
    ctx.stage_metrics.update({"quant_bits_per_weight": summary["coded_bits_per_weight"],
                              "quant_fixed_bits_per_weight": summary["bits_per_weight"],
                              "quant_index_bits": summary["index_bits"],
                              "quant_model_bits_per_weight": summary["model_bits_per_weight"],
                              "quant_layers": float(summary["layers"])})
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir(ctx.stage_index, ctx.stage_name) / "quantization_plan.json",
                          {k: v for k, v in plan.items()})
    ctx.log(f"quantize ({config.method}): {summary['layers']} layers, {summary['index_bits']} index bits, "
            f"{summary['bits_per_weight']} bits/weight quantized at fixed width, {summary['coded_bits_per_weight']} "
            f"entropy-coded as the artifact stores them ({summary['model_bits_per_weight']} whole model), "
            f"{summary['seconds']}s")
    return model


def _count_sites(model: nn.Module, config: QuantizeStageConfig) -> int:
    return len(find_sites(model, config.options.get("ignore", [])))


def without_timings(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan without its wall-clock `seconds` (kept in quantization_plan.json and the log)."""
    return {**plan, "summary": {k: v for k, v in plan["summary"].items() if k != "seconds"},
            "layers": [{k: v for k, v in entry.items() if k != "seconds"} for entry in plan["layers"]]}


STAGE = StageSpec("quantize", QuantizeStageConfig, quantize_stage)
