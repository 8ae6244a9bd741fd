"""Restorers: how a stock model is turned back into the changed one that a checkpoint or artifact records.

`model_meta[key]` holds what a stage changed; the restorer registered under `key` re-applies it to a freshly built
model before the tensors are loaded, so no module object is ever unpickled. Restorers run in the order of their
priority (`apply_restorers`), never in the order the keys happen to be stored in: shape changes (prune,
RESTORE_SHAPES) come before changes of how weights are stored (quantization, RESTORE_WEIGHT_FORM), which need the
final shapes. The two built-in ones live here, beside the formats they read, so loading imports no stage code.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.format.layers import attach_quantized
from compress.format.prune_manifest import apply_manifest
from compress.registry import Registry

Restorer = Callable[[nn.Module, Any], nn.Module]
RESTORERS: Registry[Restorer] = Registry("restorer")
RESTORER_PRIORITY: dict[str, int] = {}  # meta key -> priority: lower runs first
RESTORE_SHAPES = 100  # changes of the architecture's shapes (prune's manifest)
RESTORE_WEIGHT_FORM = 200  # changes of how weights are stored (quantized layers), made on the final shapes
DEFAULT_RESTORER_PRIORITY = 150
PRUNE_META_KEY = "prune"
QUANT_META_KEY = "quantization"
BN_FOLD_META_KEY = "bn_fold"
RESTORE_BN_FOLD = 150  # BNs folded into convs at export: after the pruned shapes, before the quantized form
PLAN_FORMAT = 1  # version of the quantization plan / model_meta["quantization"] layout


def register_restorer(key: str, priority: int = DEFAULT_RESTORER_PRIORITY) -> Callable[[Restorer], Restorer]:
    """Register how to re-apply the architecture change recorded under `model_meta[key]`; restorers run by
    ascending `priority` (then key), whatever the order of the keys in the metadata."""

    def wrap(fn: Restorer) -> Restorer:
        RESTORERS.add(key, fn)
        RESTORER_PRIORITY[key] = int(priority)
        return fn

    return wrap


def restorer_order(keys: Any) -> list[str]:
    """The keys of `model_meta` that have a restorer, in the order their restorers run."""
    return sorted((k for k in keys if k in RESTORERS),
                  key=lambda k: (RESTORER_PRIORITY.get(k, DEFAULT_RESTORER_PRIORITY), k))


def apply_restorers(model: nn.Module, model_meta: dict[str, Any]) -> nn.Module:
    """Re-apply every recorded architecture change of `model_meta` to a stock model, in priority order (keys
    without a registered restorer are left alone)."""
    for key in restorer_order(model_meta):
        model = RESTORERS[key](model, model_meta[key])
    return model


@register_restorer(PRUNE_META_KEY, priority=RESTORE_SHAPES)
def restore_pruned_shapes(model: nn.Module, manifest: Any) -> nn.Module:
    """Give a stock model the pruned shapes of the prune stage's manifest."""
    return apply_manifest(model, manifest)


def artifact_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The quantization plan as an artifact keeps it: per layer only what rebuilding needs (name, attr, layout,
    bits); measurements (errors, sensitivities, timings) stay in the run's quantization_plan.json."""
    keep = ("name", "attr", "layout", "bits")
    return {**{k: v for k, v in plan.items() if k != "layers"},
            "layers": [{k: entry[k] for k in keep if k in entry} for entry in plan.get("layers", [])]}


@register_restorer(QUANT_META_KEY, priority=RESTORE_WEIGHT_FORM)
def restore_quantization(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Give the listed layers of a stock (or pruned) model the quantized form, with empty stored tensors of the
    right shapes, so that `load_state_dict` fills them."""
    if plan.get("format") != PLAN_FORMAT:
        raise UserError(f"quantization plan format {plan.get('format')!r} is not supported (this version reads "
                        f"{PLAN_FORMAT}); use a compress version that wrote it")
    for entry in plan["layers"]:
        attach_quantized(model.get_submodule(entry["name"]), entry["layout"], None, entry["attr"])
    model.quantization_plan = plan
    return model


FOLD_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # convs a following BN folds into (not transposed)
FOLD_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_restorer(BN_FOLD_META_KEY, priority=RESTORE_BN_FOLD)
def restore_bn_fold(model: nn.Module, fold: dict[str, Any]) -> nn.Module:
    """Give each listed conv a bias (if it had none) and replace its BN with nn.Identity, as export did."""
    for conv_name, bn_name in fold["pairs"]:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if type(conv) not in FOLD_CONVS or type(bn) not in FOLD_NORMS or bn.num_features != conv.out_channels:
            raise ValueError(f"bn_fold pair ({conv_name}, {bn_name}) is not a conv followed by its BatchNorm "
                             f"({type(conv).__name__}, {type(bn).__name__})")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        model.set_submodule(bn_name, nn.Identity())
    return model
