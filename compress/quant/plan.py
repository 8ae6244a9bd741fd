"""Mixed precision: per-layer bits from a measured sensitivity, so the model meets a size target.

Sensitivity: each layer alone is quantized (the method's data-free form: k-means per group for jlcm) at
every allowed width, and the relative error it causes on the model's outputs over a few calibration
inputs is measured (8 bits is taken as lossless, error 0, to save a forward pass per layer; the widths of
`estimated_bits`, 5 and 6 by default, are scaled from the measured width below them by the ratio of the
weights' squared errors, which on MobileNetV2 gives plans within 5 % of the measured ones' summed error at
4, 3 and 2.5 bits, for two forwards per layer less); layers go in
call order and the modules before the perturbed one replay their recorded outputs (calibration.Replay), so
each pass runs the model from that layer on. Errors are taken as additive across layers. Allocation is
greedy by benefit per bit: every layer starts at the fewest bits; the upgrade (to any wider choice) with
the largest error drop per stored bit is taken while it fits the budget. Costs are exact stored bits
(indices, codebooks, scales, row maps); with `coded_indices` the indices are charged the entropy-coded size the
artifact stores them at (rANS over the data-free code's symbol counts, format.weights.stored_bits), so the budget
counts what the file holds rather than the fixed width. The fit's learned indices code to other sizes than the
data-free ones, so `reallocate_bits` re-solves the layers left after each fit (the API's option replan): the budget
less what the fitted layers store, the planned sizes scaled by the stored-to-planned ratio so far. A bits target
is a budget for the quantizable weights only; a size target counts every other parameter of the model as stored.
With the float choice (a width above 8), a layer may stay float, charged 32 bits a weight (the artifact stores
16: compress.quant.api.FLOAT_BITS); 8 bits are then measured too, since some layers (the first depthwise conv
of a MobileNetV2) lose accuracy even at 8 bits.
The sensitivity is that of the data-free form; a learned fit cuts it far more where the calibration rows
outnumber a layer's inputs, so the API can floor the bits of the underdetermined layers (`calibration_rows`,
`floored_choices`; option underdetermined_margin).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compress.models.protocol import float_outputs as model_outputs
from compress.quant.replay import Replay
from compress.quant.sites import Site, call_name, no_fastpath
from compress.format.weights import decode, storage_bits, stored_bits
from compress.quant.registry import QuantConfig, QuantMethod

__all__ = ["output_error", "measure_sensitivity", "allocate_bits", "reallocate_bits", "estimated_widths",
           "calibration_rows", "floored_choices", "batch_size"]


def output_error(outputs: list[list[torch.Tensor]], reference: list[list[torch.Tensor]], metric: str = "mse") -> float:
    """Relative squared error sum ||y - y_ref||^2 / sum ||y_ref||^2 over every output tensor of every batch;
    metric "kl": the mean KL(softmax(y_ref) || softmax(y)) of 2-D outputs (a classifier's logits: what top-1
    agreement depends on), the relative squared error for a model with other outputs."""
    if metric == "kl" and all(a.dim() == 2 for o in outputs for a in o):
        total = count = 0.0
        for o, r in zip(outputs, reference):
            for a, b in zip(o, r):
                log_p, log_q = torch.log_softmax(b.float(), 1), torch.log_softmax(a.float(), 1)
                total += float((log_p.exp() * (log_p - log_q)).sum())
                count += b.shape[0]
        return total / max(count, 1.0)
    num = sum(float(((a.float() - b.float()) ** 2).sum()) for o, r in zip(outputs, reference) for a, b in zip(o, r))
    den = sum(float((b.float() ** 2).sum()) for r in reference for b in r)
    return num / max(den, 1e-30)


@torch.no_grad()
def _run(model: nn.Module, batches: list[Any], replay: Replay | None = None,
         cutoff: float = 0.0) -> list[list[torch.Tensor]]:
    def forward(batch: Any) -> list[torch.Tensor]:
        with torch.no_grad(), no_fastpath():
            return model_outputs(model(batch))

    if replay is None:
        return [forward(b) for b in batches]
    return [replay.run(i, cutoff, lambda b=b: forward(b)) for i, b in enumerate(batches)]


def estimated_widths(widths: list[int], estimated: tuple[int, ...], proxy: bool) -> dict[int, int]:
    """Width -> the measured width (its anchor) whose output error it is scaled from, for the widths not
    measured: those of `estimated` that have a measured width below them (else above), or, with `proxy`, every
    width but the middle one. The others each take a forward pass per layer."""
    if proxy and len(widths) > 1:
        middle = widths[(len(widths) - 1) // 2]
        return {b: middle for b in widths if b != middle}
    measured = [b for b in widths if b not in estimated]
    if not measured:
        return {}
    return {b: max((m for m in measured if m < b), default=min(measured)) for b in widths if b in estimated}


@torch.no_grad()
def measure_sensitivity(model: nn.Module, sites: list[Site], batches: list[Any], method: QuantMethod,
                        config: QuantConfig, choices: tuple[int, ...],
                        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """name -> bits -> {"error": model output error with only this layer quantized, "bits": stored bits}."""
    quick = config.quick()
    widths = sorted(b for b in choices if b <= 8 and not (b >= 8 and max(choices) <= 8))
    estimated = estimated_widths(widths, tuple(getattr(config, "estimated_bits", ())),
                                 bool(getattr(config, "sensitivity_proxy", False)))
    coded = bool(getattr(config, "coded_indices", False))

    def size(layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> float:
        return float(stored_bits(layout, buffers) if coded else storage_bits(layout))

    needs_weight_error = set(estimated) | set(estimated.values())  # the estimated widths and their anchors
    # layers are perturbed in call order, so the modules that return before a layer's first call replay their
    # outputs of the passes before: each pass runs the model from the perturbed layer on
    replay = Replay(model, batches[0], getattr(config, "replay_mb", 0) << 20) if batches else None
    reference = _run(model, batches)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for i, site in enumerate(sites):
        param = site.weight
        original = param.data.clone()
        out[site.name] = {}
        cutoff = replay.cutoff([call_name(site)]) if replay is not None else 0.0
        weight_error: dict[int, float] = {}
        encoded = method.widths(original, [b for b in choices if b <= 8], quick) if method.widths is not None else {}
        for bits in choices:
            if bits > 8:  # kept float (the float choice): exact, `bits` a weight
                out[site.name][bits] = {"error": 0.0, "bits": float(bits * original.numel())}
                continue
            layout, buffers = encoded[bits] if bits in encoded else method.fn(original, None, bits, quick)
            if bits >= 8 and max(choices) <= 8:  # 8-bit codes are near-lossless: not worth a forward pass per layer
                out[site.name][bits] = {"error": 0.0, "bits": size(layout, buffers)}
                continue
            decoded = decode(layout, buffers).to(param.dtype)
            if bits in needs_weight_error:
                weight_error[bits] = float(((decoded.float() - original.float()) ** 2).sum())
            if bits in estimated:  # scaled from its anchor's measured error below
                out[site.name][bits] = {"error": None, "bits": size(layout, buffers)}
                continue
            param.data.copy_(decoded)
            out[site.name][bits] = {"error": output_error(_run(model, batches, replay, cutoff), reference,
                                                          getattr(config, "sensitivity_metric", "mse")),
                                    "bits": size(layout, buffers)}
        for bits, anchor in estimated.items():  # output error proportional to the weights' squared error
            anchor_error = out[site.name][anchor]["error"]
            out[site.name][bits]["error"] = anchor_error * weight_error[bits] / max(weight_error[anchor], 1e-30)
        param.data.copy_(original)
        if progress is not None:
            progress({"phase": "sensitivity", "layer": site.name, "index": i, "total": len(sites)})
    return out


def allocate_bits(sensitivity: dict[str, dict[int, dict[str, float]]], budget_bits: float) -> tuple[dict[str, int], bool]:
    """Bits per layer minimising the summed output error with stored bits <= budget_bits; (plan, feasible)."""
    plan = {name: min(opts) for name, opts in sensitivity.items()}
    used = sum(sensitivity[n][b]["bits"] for n, b in plan.items())
    if used > budget_bits:
        return plan, False
    return _upgrade(sensitivity, plan, used, budget_bits), True


def _upgrade(sensitivity: dict[str, dict[int, dict[str, float]]], plan: dict[str, int], used: float,
             budget_bits: float) -> dict[str, int]:
    """Greedy by benefit per bit: the upgrade with the largest error drop per stored bit, while it fits."""
    plan = dict(plan)
    while True:
        best, best_ratio = None, 0.0
        for name, b in plan.items():
            opts = sensitivity[name]
            for wider in opts:
                extra = opts[wider]["bits"] - opts[b]["bits"]
                gain = opts[b]["error"] - opts[wider]["error"]
                if wider <= b or extra <= 0 or used + extra > budget_bits or gain <= 0:
                    continue
                ratio = gain / extra
                if ratio > best_ratio:
                    best, best_ratio = (name, wider, extra), ratio
        if best is None:
            return plan
        name, wider, extra = best
        plan[name] = wider
        used += extra


def reallocate_bits(sensitivity: dict[str, dict[int, dict[str, float]]], plan: dict[str, int],
                    slack_bits: float) -> dict[str, int]:
    """The plan of the layers not yet quantized, given what the quantized ones really took: `slack_bits` is the
    budget minus their stored bits minus this plan's. Slack buys upgrades (greedy, as allocate_bits); a deficit is
    paid back by narrowings: the one adding least error among those that pay it all, else the least error per
    bit saved, repeated."""
    plan = dict(plan)
    used = sum(sensitivity[n][b]["bits"] for n, b in plan.items())
    while slack_bits < 0:
        narrowings = [(max(opts[narrower]["error"] - opts[b]["error"], 0.0), opts[b]["bits"] - opts[narrower]["bits"],
                       name, narrower)
                      for name, b in plan.items() for opts in [sensitivity[name]] for narrower in opts
                      if narrower < b and opts[narrower]["bits"] < opts[b]["bits"]]
        if not narrowings:
            return plan
        enough = [n for n in narrowings if n[1] >= -slack_bits]
        # one narrowing that pays the whole deficit: the one adding least error (what it frees beyond the deficit
        # is spent again below); else the least error per bit saved, and go on
        _, saved, name, narrower = min(enough) if enough else min(narrowings, key=lambda n: (n[0] / n[1], n[1]))
        plan[name] = narrower
        slack_bits += saved
        used -= saved
    return _upgrade(sensitivity, plan, used, used + slack_bits)


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 when it has none)."""
    parts = [batch] if torch.is_tensor(batch) else list(batch.values() if isinstance(batch, dict) else batch)
    first = next((t for t in parts if torch.is_tensor(t)), None)
    return first.shape[0] if first is not None and first.dim() else 1


@torch.no_grad()
def calibration_rows(model: nn.Module, sites: list[Site], batches: list[Any], max_samples: int) -> dict[str, int]:
    """Input rows each layer's statistics will hold: its rows per sample on the first batch (a conv: one per
    output position; a linear layer: one per token) times the calibration samples, capped at `max_samples`.
    Counted from each layer's output (rows = elements / output channels); attention layers are left out."""
    per_batch: dict[str, int] = {}
    handles = []
    for site in sites:
        if site.kind not in ("conv", "linear"):
            continue

        def hook(module: nn.Module, _a: Any, out: Any, name: str = site.name) -> None:
            if torch.is_tensor(out) and out.dim() >= 2:
                channels = out.shape[1] if out.dim() > 2 and isinstance(module, nn.modules.conv._ConvNd) else out.shape[-1]
                per_batch[name] = per_batch.get(name, 0) + out.numel() // max(channels, 1)
        handles.append(site.module.register_forward_hook(hook))
    try:
        _run(model, batches[:1])
    finally:
        for h in handles:
            h.remove()
    first = max(batch_size(batches[0]), 1)
    samples = sum(batch_size(b) for b in batches)
    return {name: min(max_samples, rows * samples // first) for name, rows in per_batch.items()}


def floored_choices(sensitivity: dict[str, dict[int, dict[str, float]]], floors: dict[str, int]
                    ) -> dict[str, dict[int, dict[str, float]]]:
    """The sensitivity table without the widths below each floored layer's floor (the float choice stays)."""
    out = {}
    for name, options in sensitivity.items():
        kept = {b: v for b, v in options.items() if b >= floors.get(name, 0)}
        out[name] = kept or options
    return out
