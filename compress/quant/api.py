"""`quantize(model, calib_batches, method, bits, **options)`: the one verb of compress.quant."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.evaluate.size import count_params, storage_bytes
from compress.format.layers import attach_quantized
from compress.format.restorers import PLAN_FORMAT
from compress.format.weights import bits_per_weight, decode, matrix_shape, storage_bits, stored_bits
from compress.models.memory_format import channels_last_on_cpu
from compress.models.protocol import to_device
from compress.quant.capture import FloatInputs, collect_stats
from compress.quant.fold import fuse_plain_biases, unfuse_plain_biases
from compress.quant.replay import Replay
from compress.quant.sites import DATA_FREE_KINDS, Site, call_name, call_order, find_sites, no_fastpath
from compress.quant.plan import (allocate_bits, batch_size, calibration_rows, floored_choices, measure_sensitivity,
                                 reallocate_bits)
from compress.quant.registry import QuantConfig, get_method, make_config, method_name
from compress.quant.stats import quadratic_loss

__all__ = ["quantize", "plan_bits", "plan_budget_bits", "PLAN_FORMAT"]

# The allocation's "keep this layer in float" choice (mixed, float_choice) is charged FLOAT_BITS a weight, twice what
# the artifact stores (FLOAT_STORED_BITS: export rounds float tensors to float16 values). Charged at 16, the plans of
# MobileNetV2 kept 15 layers float instead of 5 (depthwise convs whose 8-bit codes were near-lossless held out) and
# lost agreement on photos:val at 4 bits (docs/BENCHMARKS.md, session 15). Summaries report the stored 16.
FLOAT_BITS = 32
FLOAT_STORED_BITS = 16
Progress = Callable[[dict[str, Any]], None]


def _dense_weight_bytes(sites: list[Site]) -> int:
    return sum(s.weight.numel() * s.weight.element_size() for s in sites)


def plan_budget_bits(model: nn.Module, sites: list[Site], config: QuantConfig) -> float:
    """Stored bits the quantizable weights may take (mixed): `bits` times their count (a bit target is met by
    what is quantized: the other parameters do not count), or what `size_bytes` leaves for them once every
    other parameter and buffer of the model is counted."""
    if config.size_bytes is not None:
        dense = _dense_weight_bytes(sites)
        return 8.0 * (config.size_bytes - (storage_bytes(model, buffers=True) - dense))
    return config.bits * sum(s.weight.numel() for s in sites)


def float_params(model: nn.Module, float_layers: dict[str, str]) -> dict[str, Any]:
    """Parameters left in float and why: {"count", "share", "reasons": {reason: count}}; float_layers maps the
    quantizable weights not quantized (module name) to their reason."""
    from compress.format.layers import QuantizedWeight

    reasons: dict[str, int] = {}
    total = count_params(model)
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False)) if not isinstance(module, QuantizedWeight) \
            else module.dense_param_count() - math.prod(module.quant_layout["shape"])
        if not own:
            continue
        if name in float_layers:
            reasons[float_layers[name]] = reasons.get(float_layers[name], 0) + own
            continue
        kind = type(module).__name__
        why = ("normalisation parameters (per channel, kept float)" if "Norm" in kind else
               "biases of quantized layers (kept float)" if isinstance(module, QuantizedWeight) else
               f"not a quantizable weight ({kind})")
        reasons[why] = reasons.get(why, 0) + own
    count = sum(reasons.values())
    return {"count": count, "share": round(count / max(total, 1), 6), "reasons": reasons}


def quantize(model: nn.Module, calib_batches: Iterable[Any], method: str | QuantConfig = "jlcm",
             bits: float | None = None, progress: Progress | None = None, **options: Any) -> nn.Module:
    """Quantize the weights of `model` in place (Linear, Conv1d/2d/3d, ConvTranspose, Embedding, attention
    in- and out-projections); returns it.

    calib_batches: inputs, each passed as `model(batch)` (kept in memory; moved to the model's device).
    method: a registered method (jlcm, kmeans, rtn, nf4, or one added with `register_method`), or the config
    object of one (e.g. `JLCMConfig(bits=3)`; `bits` and options then override its fields).
    bits: uniform allocation: the index bits of every layer; mixed: the target average stored bits per quantized
    weight (codebooks, scales and maps counted; parameters never quantized, such as BatchNorm, are not), met or
    refused with UserError (None: the method's default). options: the method's config
    fields (unknown ones are refused with the valid list). progress(event) is called after each layer.
    The plan (per layer: bits, groups, weights, stored bits per weight, errors, layout) is set as
    `model.quantization_plan` (a JSON-able dict; `model_meta["quantization"]` of a checkpoint).
    """
    if isinstance(method, QuantConfig):
        options = {**method.model_dump(exclude_unset=True), **options}
        method = method_name(method)
    spec = get_method(method)
    opts = dict(options)
    if bits is not None:
        opts["bits"] = bits
    config = make_config(method, opts)
    start = time.perf_counter()
    batches_in = list(calib_batches)
    needs_data = config.needs_stats() or config.allocation == "mixed"
    if needs_data and not batches_in:
        raise UserError(f"quantize method '{method}' needs calibration batches (got none)")
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    batches = [to_device(b, device) for b in batches_in]
    views = _bn_views(model, batches, config, progress)
    batches += views
    folded = _fold(model, batches, config)
    sites = find_sites(model, config.ignore)
    if not sites:
        raise UserError(f"quantize: no Linear, Conv1d/Conv2d or attention weight left to quantize "
                        f"(ignore: {config.ignore})")
    was_training = model.training
    model.eval()
    try:
        with channels_last_on_cpu(model, scope="fit", probe=lambda: model(batches[0]) if batches else None):
            plan = _quantize(model, sites, batches, spec, config, progress, folded)
    finally:
        model.train(was_training)
    plan["summary"]["seconds"] = round(time.perf_counter() - start, 3)
    plan["summary"]["folded_batchnorms"] = len(folded)
    if config.bn_views_steps > 0:
        plan["summary"]["bn_views"] = len(views)
    model.quantization_plan = plan
    return model


def _bn_views(model: nn.Module, batches: list[Any], config: QuantConfig, progress: Progress | None) -> list[Any]:
    """bn_views_steps: a view of each calibration batch moved toward the model's BatchNorm statistics
    (compress.quant.views), taken before anything is folded."""
    if config.bn_views_steps <= 0 or not batches:
        return []
    from compress.quant.views import bn_statistic_views, viewable_batches

    total = len(viewable_batches(model, batches))
    advance = None if progress is None else (lambda i: progress({"phase": "views", "index": i, "total": total}))
    views = bn_statistic_views(model, batches, config.bn_views_steps, config.bn_views_lr, advance)
    if not views:
        import warnings

        warnings.warn("quantize: bn_views_steps made no view: it needs a model with BatchNorm running statistics "
                      "that its forward uses, and calibration batches that are one floating tensor of more than one "
                      "input each", stacklevel=3)
    return views


def _fold(model: nn.Module, batches: list[Any], config: QuantConfig) -> list[tuple[str, str]]:
    """fold_bn: BatchNorms folded into their convs (compress.quant.fold) before anything is measured."""
    if not getattr(config, "fold_bn", False) or not batches:
        return []
    from compress.quant.fold import fold_batchnorm

    with torch.no_grad(), no_fastpath():
        return fold_batchnorm(model, batches[0])


def plan_bits(model: nn.Module, calib_batches: Iterable[Any], method: str = "jlcm", bits: float | None = None,
              progress: Progress | None = None, **options: Any) -> dict[str, Any]:
    """The bits `quantize` would give each layer, without quantizing: {"bits": {layer: bits}, "sensitivity":
    {layer: {bits: {"error", "bits"}}}, "feasible": bool} (mixed allocation measures sensitivity)."""
    config = make_config(method, {**options, **({} if bits is None else {"bits": bits})})
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    batches = [to_device(b, device) for b in calib_batches]
    sites = find_sites(model, config.ignore)
    was_training = model.training
    model.eval()
    try:
        ordered, _ = call_order(model, sites, batches[0]) if batches else (sites, {})
        layer_bits, sensitivity, feasible, floors, _ = _allocate(model, ordered, batches, get_method(method), config,
                                                                 progress)
    finally:
        model.train(was_training)
    return {"bits": layer_bits, "sensitivity": sensitivity, "feasible": feasible, "floors": floors}


def _allocate(model: nn.Module, ordered: list[Site], batches: list[Any], spec: Any, config: QuantConfig,
              progress: Progress | None, folded: list[tuple[str, str]] = ()
              ) -> tuple[dict[str, int], dict[str, dict[int, dict[str, float]]], bool, dict[str, int], Any]:
    """Per-layer bits: uniform, or from the measured sensitivity to meet the target (mixed); the floors that held
    (underdetermined_margin); and (budget bits, the choices allocated from) for replanning (None: uniform). The
    `folded` conv -> BN pairs have their BN bias added by the conv during the sensitivity passes
    (compress.quant.fold.fuse_plain_biases)."""
    if config.allocation == "uniform":
        return {s.name: int(config.bits) for s in ordered}, {}, True, {}, None
    if not batches:
        raise UserError("allocation mixed measures sensitivity on calibration batches (got none)")
    choices = tuple(sorted(set(config.bit_choices))) + ((FLOAT_BITS,) if config.float_choice else ())
    sens_batches = _first_samples(batches, config.sensitivity_samples)
    with channels_last_on_cpu(model, scope="sensitivity", probe=lambda: model(sens_batches[0])):
        fuse_plain_biases(model, list(folded))
        try:
            sensitivity = measure_sensitivity(model, ordered, sens_batches, spec, config, choices, progress)
        finally:
            unfuse_plain_biases(model)
    budget = plan_budget_bits(model, ordered, config)
    underdetermined = _underdetermined_floors(model, ordered, batches, config)
    fewest = getattr(config, "min_bits", None)
    everywhere = {name: max(underdetermined.get(name, 0), fewest) for name in sensitivity} if fewest else {}
    for floors in [f for f in (everywhere, underdetermined) if f] + [{}]:  # the first floors that fit the budget
        allowed = floored_choices(sensitivity, floors) if floors else sensitivity
        layer_bits, feasible = allocate_bits(allowed, budget)
        if feasible:
            break
    if not feasible:
        floor = sum(min(v["bits"] for v in opts.values()) for opts in sensitivity.values())
        n = sum(s.weight.numel() for s in ordered)
        if config.size_bytes is None:
            target = f"{config.bits:g} bits per quantized weight"
            need = f"at least {floor / n:.3f} (the fewest bits, {min(choices)}, with codebooks and maps)"
        else:
            target = f"size_bytes {config.size_bytes:,}"
            need = f"at least {config.size_bytes + (floor - budget) / 8:,.0f} bytes"
        raise UserError(f"quantize: the target {target} cannot be met: it needs {need}; ask for more, or add "
                        "narrower bit_choices / ignore layers")
    return layer_bits, sensitivity, feasible, floors, (budget, allowed)


def _underdetermined(model: nn.Module, ordered: list[Site], batches: list[Any], config: QuantConfig) -> set[str]:
    """Layers whose calibration rows are fewer than their inputs (an underdetermined least-squares fit)."""
    rows = calibration_rows(model, ordered, batches, config.max_samples)
    return {s.name for s in ordered if s.name in rows and rows[s.name] < matrix_shape(s.weight.shape)[1]}


def _underdetermined_floors(model: nn.Module, ordered: list[Site], batches: list[Any],
                            config: QuantConfig) -> dict[str, int]:
    """underdetermined_margin: the fewest bits of each layer whose calibration rows are fewer than its inputs
    (its least-squares fit cannot pin the weights down, so its learned error stays near the data-free one the
    sensitivity measured, while the other layers' fall well below theirs)."""
    margin = getattr(config, "underdetermined_margin", None)
    if margin is None or config.size_bytes is not None:
        return {}
    floor = math.floor(config.bits) - margin
    if floor <= 1:
        return {}
    return dict.fromkeys(_underdetermined(model, ordered, batches, config), floor)


def _quantize(model: nn.Module, sites: list[Site], batches: list[Any], spec: Any, config: QuantConfig,
              progress: Progress | None, folded: list[tuple[str, str]]) -> dict[str, Any]:
    ordered, counts = call_order(model, sites, batches[0]) if batches else (sites, {})
    for site in ordered:  # no input statistics for these: quantized from their weights alone
        if site.kind in DATA_FREE_KINDS:
            counts[site.name] = 0
    target = {"bits": config.bits} if config.size_bytes is None else {"size_bytes": config.size_bytes}
    layer_bits, sensitivity, feasible, floors, budget = _allocate(model, ordered, batches, spec, config, progress,
                                                                  folded)
    replan = budget if config.replan and budget is not None else None
    spent, replanned = 0.0, []
    coded_total = 0  # the quantized layers' stored bits, summed before any rounding
    measured = charged = 0.0  # stored and planned bits of the quantized layers so far
    with_stats = config.needs_stats() and bool(batches)
    keep_float = (with_stats and config.sequential) or ((config.bias_correction > 0 or config.tune_steps > 0)
                                                         and bool(batches))
    float_model = copy.deepcopy(model) if keep_float else model
    stats_all = {}
    float_inputs, replay = None, None
    pooled = {}
    if with_stats and config.pooled_prior > 0:  # underdetermined linear layers: a prior from their pooled map
        underdetermined = _underdetermined(model, ordered, batches, config)
        pooled = {s.name: config.pooled_prior for s in ordered if s.kind == "linear" and s.name in underdetermined}
    if with_stats and config.sequential:
        replay = Replay(model, batches[0], config.replay_mb << 20)
        float_inputs = FloatInputs(float_model, ordered, batches, counts, config.max_samples, config.seed,
                                   config.cache_mb << 20, Replay(float_model, batches[0], config.replay_mb << 20))
    if with_stats and not config.sequential:
        stats_all = collect_stats(model, None, [s for s in ordered if counts.get(s.name)], batches, counts,
                                  config.max_samples, config.seed, pooled=pooled)
    layers = []
    kept_float: list[dict[str, Any]] = []
    float_layers = {name: f"ignored (option ignore: {config.ignore})" for name in _ignored(model, config)}
    quantized_any = False
    for i, site in enumerate(ordered):
        t0 = time.perf_counter()
        stats = None
        if with_stats and config.sequential and i % config.window == 0:
            # inputs of the next `window` layers from one pass of the model quantized so far
            window = [s for s in ordered[i:i + config.window] if counts.get(s.name)]
            stats_all = collect_stats(float_model, model if quantized_any else None, window, batches, counts,
                                      config.max_samples, config.seed, {s.name: float_inputs.get(s) for s in window},
                                      replay, {s.name: pooled[s.name] for s in window if s.name in pooled})
        if with_stats and counts.get(site.name):
            stats = stats_all.pop(site.name, None)
        weight = site.weight.detach()
        if replan is not None and i:  # the layers left get what the quantized ones did not take
            total, allowed = replan
            rest = {s.name: layer_bits[s.name] for s in ordered[i:]}
            if charged > 0:  # the layers left are expected to store, per planned bit, what the quantized ones did
                ratio = measured / charged
                allowed = {n: {b: {**v, "bits": v["bits"] * (ratio if b < FLOAT_BITS else 1.0)}
                               for b, v in allowed[n].items()} for n in rest}
            slack = total - spent - sum(allowed[n][b]["bits"] for n, b in rest.items())
            for name, new in reallocate_bits(allowed, rest, slack).items():
                if new != layer_bits[name]:
                    replanned.append({"name": name, "from": layer_bits[name], "to": new, "before": site.name})
                    layer_bits[name] = new
        bits = layer_bits[site.name]
        if bits >= FLOAT_BITS:  # the allocation keeps it float: the best use of the budget for this layer
            float_layers[site.name] = "kept float by the mixed allocation (sensitive and small)"
            kept_float.append({"name": site.name, "weights": weight.numel(), "bits_per_weight": FLOAT_STORED_BITS})
            spent += FLOAT_BITS * weight.numel()
            if progress is not None:
                progress({"phase": "quantize", "layer": site.name, "index": i, "total": len(ordered), "bits": bits,
                          "bits_per_weight": FLOAT_STORED_BITS, "error": 0.0, "seconds": 0.0})
            continue
        layout, buffers = spec.fn(weight, stats, bits, config)
        error = None
        if stats is not None:
            rows, cols = matrix_shape(weight.shape)
            error = float(quadratic_loss(decode(layout, buffers).reshape(rows, cols).to(stats.H.device),
                                         weight.float().reshape(rows, cols), stats))
        attach_quantized(site.module, layout, buffers, site.attr)
        if replay is not None:
            replay.invalidate(call_name(site))
        quantized_any = True
        coded = stored_bits(layout, buffers)
        coded_total += coded
        entry = {"name": site.name, "attr": site.attr, "kind": site.kind, "shape": list(weight.shape),
                 "weights": weight.numel(), "bits": bits, "groups": layout.get("groups"),
                 "bits_per_weight": round(bits_per_weight(layout), 4),
                 "coded_bits_per_weight": round(coded / weight.numel(), 4), "error": error,
                 "sensitivity": sensitivity.get(site.name, {}).get(bits, {}).get("error"),
                 "seconds": round(time.perf_counter() - t0, 3), "layout": layout}
        layers.append(entry)
        cost = coded if config.coded_indices else storage_bits(layout)  # what the budget counts for this layer
        spent += cost
        if replan is not None:
            measured += cost
            charged += replan[1][site.name][bits]["bits"]
        if progress is not None:
            progress({"phase": "quantize", "layer": site.name, "index": i, "total": len(ordered), "bits": bits,
                      "bits_per_weight": entry["bits_per_weight"], "error": error, "seconds": entry["seconds"]})
    corrected = 0
    if config.bias_correction > 0 and batches and float_model is not model:
        from compress.quant.bias import correct_bias

        done = {e["name"] for e in layers}
        corrected = correct_bias(float_model, model, [s for s in ordered if s.name in done],
                                 _first_samples(batches, 64), config.bias_correction)
    del float_inputs, replay
    tuning = None
    if config.tune_steps > 0 and batches and float_model is not model:
        from compress.quant.tune import tune_codebooks

        advance = None if progress is None else (lambda loss: progress({"phase": "tune", "loss": loss,
                                                                         "total": config.tune_steps}))
        tuning = tune_codebooks(float_model, model, batches, config.tune_steps, config.tune_lr, advance)
    del float_model
    n_quant = max(sum(e["weights"] for e in layers), 1)
    n = n_quant + sum(e["weights"] for e in kept_float)
    float_bits = FLOAT_STORED_BITS * sum(e["weights"] for e in kept_float)
    stored = sum(storage_bits(e["layout"]) for e in layers) + float_bits
    coded = coded_total + float_bits
    summary = {"layers": len(layers), "weights": n_quant,
               "index_bits": round(sum(e["bits"] * e["weights"] for e in layers) / n_quant, 4),
               "bits_per_weight": round(stored / n, 4), "coded_bits_per_weight": round(coded / n, 4),
               "coded_bits": int(coded),
               "kept_float": kept_float,
               "float_params": float_params(model, float_layers),
               "model_bits_per_weight": round(8 * storage_bytes(model) / max(count_params(model), 1), 4),
               "size_bytes": storage_bytes(model), "target": target, "feasible": feasible,
               "bias_corrected_layers": corrected, "bit_floors": floors, "replanned": replanned, "tuning": tuning}
    return {"format": PLAN_FORMAT, "method": spec.name, "options": config.model_dump(mode="json"),
            "layers": layers, "summary": summary}


def _ignored(model: nn.Module, config: QuantConfig) -> list[str]:
    """Quantizable weights that the `ignore` option keeps float (module names)."""
    if not config.ignore:
        return []
    kept = {s.name for s in find_sites(model, config.ignore)}
    return [s.name for s in find_sites(model) if s.name not in kept]


def _first_samples(batches: list[Any], samples: int) -> list[Any]:
    """The first batches holding about `samples` inputs (batch size read from the first tensor)."""
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        out.append(batch)
        seen += batch_size(batch)
    return out
