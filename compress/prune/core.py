"""Group channel pruning of one model: analyse -> thresholds (given or searched) -> fold -> remove -> verify.

    analysis = analyze(model, x)                   units of coupled channels, their carriers and groups
    ratios   = config.ratios | search_ratios(...)  p_g per group
    keeps    = Decider(...).decide_all(ratios)     keep masks per unit (votes, ties, balance, floor)
    fold_removed(...)                              constants of removed channels into their readers
    phase 1: units whose removal is exact (no LayerNorm / GroupNorm on them) and attention heads;
             the result must equal a masked copy (removed channels' reader columns zeroed) to 1e-4
    phase 2: units through a LayerNorm (removal changes the norm's statistics, so only the forward pass
             and the output shapes are checked)
When the phase-1 check fails, units are re-tried one by one on fresh copies to name the one at fault.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.prune.attention import prune_heads
from compress.prune.config import PruneConfig, ScopeConfig
from compress.prune.bn_correct import bn_input_moments, correct_bn
from compress.prune.data_score import score_from_data
from compress.prune.fold import fold_removed
from compress.prune.graph import Analysis, Unit, analyze, extra_out_tensors, sync_split_sizes
from compress.prune.groups import GroupAssigner, ratio_for
from compress.format.prune_manifest import make_manifest, snapshot
from compress.prune.masks import Decider
from compress.prune.search import CostModel, search_ratios
from compress.errors import PruneError
from compress.models.protocol import RawForward, as_batch, flat_tensors, raw_forward

Log = Callable[[str], None]


class UnitRemovalError(PruneError):
    """Removing these units breaks the model (torch-pruning mis-maps their channels); `units` names them."""

    def __init__(self, message: str, units: Sequence[str]) -> None:
        super().__init__(message)
        self.units = [u.split("#")[0] for u in units]


@dataclass
class PruneResult:
    model: nn.Module
    manifest: dict[str, Any]
    ratios: dict[str, float]
    figures: dict[str, float] = field(default_factory=dict)


def analyze_scope(model: nn.Module, example_input: Any, scope: ScopeConfig | None = None) -> Analysis:
    """`analyze` with the groups / ignore / outputs settings of a recipe section."""
    scope = scope or ScopeConfig()
    assigner = GroupAssigner(scope.groups, scope.family_depth)
    return analyze(model, as_batch(example_input), scope.ignore, scope.protect_outputs, assigner)


def measure(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Parameters and MACs (torch-pruning's counter, on the raw forward of one image)."""
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(RawForward(model).eval(), x[:1])
    return {"params": float(sum(p.numel() for p in model.parameters())), "macs": float(macs)}


def prepare(model: nn.Module, example_input: Any, scope: ScopeConfig | None
            ) -> tuple[torch.Tensor, bool, dict[str, float], Analysis, list[Unit]]:
    """Put `model` in eval mode and analyse it: (batch, was_training, figures before, analysis, prunable units);
    a model with nothing to prune is refused with the reasons."""
    x = as_batch(example_input)
    was_training = model.training
    model.eval()
    before = measure(model, x)
    analysis = analyze_scope(model, x, scope)
    units = analysis.prunable_units()
    if not units:
        reasons = sorted({u.reason or "" for u in analysis.units})
        raise PruneError(f"{type(model).__name__}: no prunable channels ("
                         + ("; ".join(reasons[:5]) or "no conv or linear layers") + ")")
    return x, was_training, before, analysis, units


def prune_model(model: nn.Module, config: PruneConfig, example_input: Any, log: Log = print,
                retries: int = 3, batches: Sequence[Any] | None = None) -> PruneResult:
    """Prune `model` in place as `config` says; returns it with its shape manifest and the p_g used.

    When removing a unit breaks the model (torch-pruning mis-maps its channels), the model is put back, that
    unit's layers are kept whole (added to `ignore`, with a warning) and the search runs again, so the target
    is met from the other units; up to `retries` times, then the error is raised. `batches`: the images the
    data importance (`config.importance == "data"`) reads."""
    pristine = copy.deepcopy(model) if retries > 0 else None
    try:
        return _prune_once(model, config, example_input, log, batches, pristine)
    except UnitRemovalError as exc:
        if retries <= 0 or not exc.units or any(u in config.ignore for u in exc.units):
            raise
        model.__dict__.update(pristine.__dict__)  # the unpruned modules, in the object the caller holds
        log(f"prune: WARNING {exc}; keeping {', '.join(exc.units)} whole and searching again")
        retry = config.model_copy(update={"ignore": [*config.ignore, *exc.units]})
        return prune_model(model, retry, example_input, log, retries - 1, batches)


def _prune_once(model: nn.Module, config: PruneConfig, example_input: Any, log: Log,
                batches: Sequence[Any] | None = None, pristine: nn.Module | None = None) -> PruneResult:
    x, was_training, before_figures, analysis, units = prepare(model, example_input, config)
    data = batches if config.importance == "data" else None
    if config.importance == "data":
        if not data:
            raise PruneError("prune: importance 'data' needs calibration batches")
        rescored = score_from_data(analysis, data)
        log(f"prune: data importance on {sum(len(as_batch(b)) for b in data)} images "
            f"({rescored} of {len(units)} units; the rest by |gamma| / magnitude)")
    decider = Decider(units, config.vote, config.floor_share, config.floor_min)
    if config.target is not None:
        cost = CostModel(analysis, units)
        ratios = search_ratios(decider, cost, config.target, config.search_step, log=log)
    else:
        ratios = {g: ratio_for(g, config.ratios) or 0.0 for g in decider.groups}
        unmatched = [g for g in decider.groups if ratio_for(g, config.ratios) is None]
        if unmatched:
            log(f"prune: groups without a ratio (not pruned): {', '.join(unmatched)}")
    log("prune: p_g " + " ".join(f"{g}={p:.6g}" for g, p in ratios.items()))
    keeps = decider.decide_all(ratios)
    shapes = snapshot(model)
    before_bn = bn_input_moments(model, data) if data and config.correct_bn else None
    if config.fold:
        folded = fold_removed(analysis, units, keeps, data)
        log(f"prune: folded {folded['folded']} removed channels into the next layers "
            + ("(their mean on the calibration images)" if data else f"({folded['not_constant']} were not constant)"))
    if before_bn is not None:
        after_bn = bn_input_moments(masked_copy(model, [(u, k) for u, k in zip(units, keeps) if u.exact]), data)
        log(f"prune: BatchNorm statistics of {correct_bn(model, before_bn, after_bn)} layers corrected by what the "
            "removed channels carried")
    remove_units(analysis, units, keeps, verify=config.verify, scope=config, pristine=pristine)
    model.train(was_training)
    after_figures = measure(model, x)
    figures = {"params_ratio": after_figures["params"] / before_figures["params"],
               "macs_ratio": after_figures["macs"] / max(before_figures["macs"], 1.0),
               "channels_removed": float(sum(int((~k).sum()) for u, k in zip(units, keeps) if u.kind == "channels")),
               "heads_removed": float(sum(int((~k).sum()) for u, k in zip(units, keeps) if u.kind == "heads"))}
    log(f"prune: params x{figures['params_ratio']:.3f}, MACs x{figures['macs_ratio']:.3f}, "
        f"{int(figures['channels_removed'])} channels and {int(figures['heads_removed'])} heads removed")
    if config.target is not None:
        off = off_target(figures, config.target, analysis)
        if off:
            log(f"prune: WARNING {off}")
    return PruneResult(model, make_manifest(shapes, model), ratios, figures)


def off_target(figures: dict[str, float], target: dict[str, float], analysis: Analysis, tolerance: float = 0.02
               ) -> str | None:
    """Why the removed share misses the target by more than `tolerance` (None when it does not): the shares
    reached and the most common reasons channels were kept whole (by channel count)."""
    reached = {m: 1.0 - figures[f"{m}_ratio"] for m in target}
    missed = {m: v for m, v in reached.items() if abs(v - target[m]) > tolerance}
    if not missed:
        return None
    held: dict[str, int] = {}
    for unit in analysis.units:
        if not unit.prunable:
            why = re.sub(r" in (?!the )\S+", "", re.sub(r"\[[^\]]*\]", "[...]", _generic_reason(unit.reason)))
            held[why] = held.get(why, 0) + unit.size
    total = sum(u.size for u in analysis.units) or 1
    top = sorted(held.items(), key=lambda kv: -kv[1])[:3]
    why = "; ".join(f"{n / total:.0%} of channels: {r}" for r, n in top) or "no channel is held whole"
    return ("target missed: removed " + ", ".join(f"{v:.3f} of {m} (target {target[m]})" for m, v in missed.items())
            + f"; kept whole: {why}")


def remove_units(analysis: Analysis, units: Sequence[Unit], keeps: Sequence[np.ndarray], verify: bool = True,
                 scope: ScopeConfig | None = None, pristine: nn.Module | None = None) -> None:
    """Physically remove the dropped elements (phase 1 exact + heads, then phase 2), checking each phase.

    `pristine`: an unpruned copy the caller already holds (for naming a culprit unit); without it one is made,
    which on a 600 M-parameter model is 2.5 GB more at the peak."""
    model, x = analysis.model, analysis.example
    chosen = [(u, k) for u, k in zip(units, keeps) if not k.all()]
    phase1 = [(u, k) for u, k in chosen if u.exact]
    phase2 = [(u, k) for u, k in chosen if not u.exact]
    if verify and pristine is None:
        pristine = copy.deepcopy(model)
    reference = masked_copy(model, phase1) if verify else None
    for unit, keep in phase1:
        _remove(analysis, unit, keep)
    if verify:
        problem = compare_outputs(reference, model, x)
        if problem:
            culprit = _find_culprit(pristine, x, phase1, scope)
            raise UnitRemovalError(f"pruning {culprit} gives a wrong model ({problem}); torch-pruning mis-maps "
                                   f"its channels: add '{culprit.split('#')[0]}' to the prune stage's ignore list",
                                   [] if culprit == "several units together" else [culprit])
        del reference, pristine
    if phase2:
        expected = [t.shape for t in flat_tensors(_run(model, x))]
        for unit, keep in phase2:
            _remove(analysis, unit, keep)
        if verify:
            try:
                got = [t.shape for t in flat_tensors(_run(model, x))]
            except Exception as exc:
                raise UnitRemovalError(f"after pruning {', '.join(u.name for u, _ in phase2)} the forward pass fails "
                                       f"({type(exc).__name__}: {exc}); add them to the prune stage's ignore list",
                                       [u.name for u, _ in phase2]) from exc
            if got != expected:
                raise PruneError(f"pruning changed the output shapes from {expected} to {got}")


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor) -> Any:
    model.eval()
    return raw_forward(model, x)


def _remove(analysis: Analysis, unit: Unit, keep: np.ndarray) -> None:
    remove = np.flatnonzero(~keep).tolist()
    if unit.kind == "heads":
        prune_heads(analysis.model.get_submodule(unit.attention), remove)
        return
    graph = analysis.graph
    try:
        group = graph.get_pruning_group(unit.root_module, unit.root_fn, remove)
        if not graph.check_pruning_group(group):
            raise PruneError(f"pruning {len(remove)} of {unit.size} channels of {unit.name} would empty a layer")
        extra = [(dep.target.module, name, sorted(set(idxs))) for dep, idxs in group
                 if graph.is_out_channel_pruning_fn(dep.handler) for name in extra_out_tensors(dep.target.module)]
        group.prune()
        _cut_extra_tensors(extra)
    except PruneError:
        raise
    except Exception as exc:  # torch-pruning's own failures, with the layer named
        raise PruneError(f"torch-pruning failed to remove channels of {unit.name}: {type(exc).__name__}: {exc}") from exc
    sync_split_sizes(graph, analysis.records)


@torch.no_grad()
def _cut_extra_tensors(extra: Sequence[tuple[nn.Module, str, list[int]]]) -> None:
    """Remove the pruned output channels from a layer's per-channel tensors torch-pruning does not know."""
    for module, name, removed in extra:
        tensor = getattr(module, name)
        keep = torch.as_tensor(sorted(set(range(tensor.shape[0])) - set(removed)), device=tensor.device)
        cut = tensor.data.index_select(0, keep).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(cut, requires_grad=tensor.requires_grad))
        else:
            module._buffers[name] = cut


@torch.no_grad()
def masked_copy(model: nn.Module, chosen: Sequence[tuple[Unit, np.ndarray]]) -> nn.Module:
    """A copy whose readers ignore the removed channels (input columns zeroed): what removal must equal."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for unit, keep in chosen:
        for m in unit.members:
            layer = modules.get(m.module)
            if m.dim != "in" or not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            local = np.unique(m.local[~keep[m.root]])
            if len(local) == 0:
                continue
            if isinstance(layer, nn.Linear):
                layer.weight[:, torch.as_tensor(local, device=layer.weight.device)] = 0
                continue
            per_in = layer.in_channels // layer.groups
            per_out = layer.out_channels // layer.groups
            for c in local.tolist():
                g = c // per_in
                if layer.transposed:
                    layer.weight[c] = 0
                else:
                    layer.weight[g * per_out:(g + 1) * per_out, c % per_in] = 0
    return ref


def compare_outputs(reference: nn.Module, model: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> str | None:
    """None when both give the same outputs (to tol x (1 + max |reference|)), else what differs."""
    want = flat_tensors(_run(reference, x))
    try:
        got = flat_tensors(_run(model, x))
    except Exception as exc:  # e.g. a layer with per-channel state torch-pruning does not know
        return f"its forward pass fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if [t.shape for t in want] != [t.shape for t in got]:
        return f"output shapes {[tuple(t.shape) for t in got]} instead of {[tuple(t.shape) for t in want]}"
    for i, (a, b) in enumerate(zip(want, got)):
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = 1 + a.double().abs().max().item() if a.numel() else 1.0
        if not diff <= tol * scale:
            return f"output {i} differs from the masked reference by {diff:.3g} (scale {scale:.3g})"
    return None


def _find_culprit(pristine: nn.Module, x: torch.Tensor, chosen: Sequence[tuple[Unit, np.ndarray]],
                  scope: ScopeConfig | None) -> str:
    """Prune the units one at a time on fresh copies; the first whose result is wrong."""
    for unit, keep in chosen:
        trial = copy.deepcopy(pristine)
        analysis = analyze_scope(trial, x, scope)
        match = [u for u in analysis.units if u.name == unit.name and u.prunable]
        if not match:
            continue
        reference = masked_copy(trial, [(match[0], keep)])
        try:
            _remove(analysis, match[0], keep)
        except PruneError:
            return unit.name
        if compare_outputs(reference, trial, x):
            return unit.name
    return "several units together"


def describe_groups(model: nn.Module, example_input: Any, scope: ScopeConfig | None = None) -> list[dict[str, Any]]:
    """Rows for `compress inspect --groups`: one per group of prunable layers, then one per reason a set of
    units must stay whole. Keys: group, stride, family, score, layers, channels, mean_score, examples, note."""
    analysis = analyze_scope(model, example_input, scope)
    rows: dict[str, dict[str, Any]] = {}
    for unit in analysis.prunable_units():
        for c in unit.carriers:
            row = rows.setdefault(c.group, {"group": c.group, "stride": c.stride, "family": c.group.split("/", 1)[-1],
                                            "score": set(), "layers": 0, "channels": 0, "_sum": 0.0, "examples": [],
                                            "note": ""})
            row["score"].add("|gamma|" if c.kind == "gamma" else "magnitude")
            row["layers"] += 1
            row["channels"] += len(c.roots)
            row["_sum"] += float(c.score.sum())
            if len(row["examples"]) < 3:
                row["examples"].append(c.name)
    out = []
    for row in sorted(rows.values(), key=lambda r: (r["stride"] is None, r["stride"] or 0, r["family"])):
        row["score"] = "+".join(sorted(row["score"]))
        row["mean_score"] = row.pop("_sum") / max(row["channels"], 1)
        out.append(row)
    reasons: dict[str, list[Unit]] = {}
    for unit in analysis.units:
        if not unit.prunable:
            reasons.setdefault(_generic_reason(unit.reason), []).append(unit)
    for reason, kept in reasons.items():
        out.append({"group": "(kept whole)", "stride": None, "family": "", "score": "", "layers": len(kept),
                    "channels": sum(u.size for u in kept), "mean_score": 0.0,
                    "examples": [u.name for u in kept[:3]], "note": reason})
    return out


def _generic_reason(reason: str | None) -> str:
    """Group similar reasons ("layer X produces a model output" for many X) under one row."""
    return re.sub(r"(layer|GroupNorm|attention|ignored) \S+", r"\1 ...", reason or "")
