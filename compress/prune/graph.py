"""Coupled channels ("units") of a model, from torch-pruning's dependency graph plus our fixes.

A *unit* is one torch-pruning group: channels that must be removed together (a conv's outputs, its BN,
the depthwise convs and element-wise ops on them, every consumer's input columns, residual partners,
concat slices). Its elements are numbered in the root layer's output coordinate ("root index").

    Unit.members   (module, "out" | "in", local index, root index) for every layer the unit cuts
    Unit.carriers  where the importance scores come from: BatchNorm scales (|gamma|), or, for units
                   without BN, the L2 norm of the producing weight rows (magnitude fallback)
    Unit.ties      elements kept or removed together (same position in every group of a grouped conv)
    Unit.balance   sets of equal parts that must keep equal counts (the parts of a `chunk`)
    Unit.reason    why the unit must stay whole (None: prunable)

What we add to torch-pruning 1.6 (its own handling is wrong for these):
- `split` / `chunk`: torch-pruning maps the i-th *consumer* of a split to the i-th part. We read the
  autograd edge (`next_functions[k][1]` is the part index) and install our own index mappings, and we set
  every channel concat's sizes from what the forward pass really concatenated. A `chunk` into equal parts
  stays prunable with the rule "every part keeps the same count" (the model's `chunk(n)` keeps working);
  splits with fixed sizes, channel slices, `unbind`, `expand` make the unit unprunable (reason given).
- Output layers: conv/linear layers whose channels reach the model output without another channel-mixing
  layer are found in the graph and never used as roots (their groups are also the slow ones to build).
- Attention (timm `Attention`: `qkv`, `proj`, `num_heads`, `head_dim`): the qkv rows are never cut by
  torch-pruning; whole heads are pruned by `compress.prune.attention` instead (one "heads" unit each).
- GroupNorm: removing channels would regroup the normalisation, so units through a GroupNorm stay whole.
- Shared channels: root elements that reach the same channel of a layer (GhostNet's concat of a conv and a
  depthwise conv of it) are tied; torch-pruning's merge hides them (`_shared_channels`).
- Conv / linear subclasses: per-output-channel tensors besides weight and bias (ScaledStdConv2d's `gain`) are cut
  by `compress.prune.core`; input cuts of a layer with its own forward are checked by shape only (`own_forward`).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency import index_mapping, shape_infer

from compress.prune.groups import GroupAssigner, compile_pattern, matches
from compress.models.protocol import raw_forward
from compress.prune.trace import LayerInfo, OpRecords, record_ops, regroups_channels, trace_layers
from compress.prune.units import Carrier, Member, Unit
from compress.prune.attention import head_units

OT = ops.OPTYPE
MIXING = {OT.CONV, OT.LINEAR, OT.MHA, OT.LSTM, OT.EMBED}
WEIGHTED = {OT.CONV, OT.DEPTHWISE_CONV, OT.LINEAR, OT.BN, OT.LN, OT.GN, OT.IN, OT.PRELU, OT.EMBED,
            OT.PARAMETER, OT.MHA, OT.LSTM}
CHANNEL_STATS = {OT.LN, OT.GN, OT.MHA, OT.LSTM}  # removal changes what the remaining channels compute


@dataclass
class Analysis:
    model: nn.Module
    example: torch.Tensor
    graph: tp.DependencyGraph
    layers: dict[str, LayerInfo]
    units: list[Unit]
    output_layers: list[str]
    records: OpRecords

    def prunable_units(self) -> list[Unit]:
        return [u for u in self.units if u.prunable]

    def gamma_channels(self) -> dict[str, np.ndarray]:
        """BN name -> bool [C]: the channels of prunable units whose |gamma| decides their fate."""
        out: dict[str, np.ndarray] = {}
        modules = dict(self.model.named_modules())
        for unit in self.prunable_units():
            for c in unit.carriers:
                if c.kind != "gamma":
                    continue
                mask = out.setdefault(c.name, np.zeros(modules[c.name].num_features, dtype=bool))
                for local in c.locals:
                    mask[local] = True
        return out

    def carrier_groups(self) -> dict[str, str]:
        return {c.name: c.group for u in self.prunable_units() for c in u.carriers}


# ----------------------------------------------------------------------------------------------------
# Building torch-pruning's graph with correct split / concat index mappings.


class _SplitPartMapping:
    """Index mapping between a split's input (channels of all parts) and part `part` of it."""

    def __init__(self, split_op: Any, part: int, parts: int, reverse: bool) -> None:
        self.split_op, self.part, self.parts, self.reverse = split_op, part, parts, reverse

    def __call__(self, idxs: list) -> list:
        sizes = self.split_op.split_sizes[: self.parts]
        start = sum(sizes[: self.part])
        end = start + sizes[self.part]
        H = tp._helpers._HybridIndex
        if self.reverse:  # part coordinate -> split input coordinate
            return [H(idx=i.idx + start, root_idx=i.root_idx) for i in idxs]
        return [H(idx=i.idx - start, root_idx=i.root_idx) for i in idxs if start <= i.idx < end]


def _fix_splits_and_cats(graph: tp.DependencyGraph, records: OpRecords) -> dict[Any, str]:
    """Install part-aware mappings on channel splits and true sizes on channel concats.

    Returns, per split node, why units through it cannot be pruned ("" when they can).
    """
    problems: dict[Any, str] = {}
    for node in graph.module2node.values():
        if node.type == OT.CONCAT:
            rec = records.cats.get(node.grad_fn)
            if rec is not None:
                dim, sizes = rec
                if dim == 1 and len(sizes) == len(node.inputs):
                    node.module.concat_sizes = list(sizes)
        if node.type != OT.SPLIT:
            continue
        rec = records.splits.get(node.grad_fn)
        where = f" in {rec.module or 'the model'}" if rec is not None else ""
        if rec is None:
            problems[node] = "a split the trace could not identify"
            continue
        if not rec.on_channels:
            continue  # a split along space or tokens: every part carries all channels
        if rec.kind == "unbind":
            problems[node] = f"torch.unbind along the channel axis{where}"
            continue
        if not rec.equal_chunks:
            problems[node] = (f"torch.{rec.kind} into fixed sizes {rec.sizes} along the channel axis{where} "
                              "(the sizes are literals in the model's code)")
        parts = len(rec.sizes)
        # part index of each edge, read from the consumers' autograd edges
        part_of: dict[Any, list[int]] = {}
        for out_node in dict.fromkeys(node.outputs):
            fns = getattr(out_node.grad_fn, "next_functions", ())
            part_of[out_node] = [nr for fn, nr in fns if fn is node.grad_fn]
        if any(len(part_of[n]) != node.outputs.count(n) for n in part_of):
            problems[node] = f"a split{where} whose consumers the trace could not match to its parts"
            continue
        node.enable_index_mapping = False  # torch-pruning must not overwrite ours
        sizes = list(rec.sizes) + [rec.sizes[-1]] * max(0, len(node.outputs) - parts)
        node.module.split_sizes = sizes  # entries past `parts` only keep torch-pruning's lookups in range
        node.module.offsets = list(np.cumsum([0] + sizes))
        seen: dict[Any, int] = {}
        for dep in node.dependencies:  # split -> consumer
            if dep.target in part_of:
                k = seen.get(dep.target, 0)
                seen[dep.target] = k + 1
                dep.index_mapping[0] = _SplitPartMapping(node.module, part_of[dep.target][k], parts, reverse=False)
        for consumer, nrs in part_of.items():  # consumer -> split
            k = 0
            for dep in consumer.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitPartMapping(node.module, nrs[k], parts, reverse=True)
                    k += 1
        problems.setdefault(node, "")
    return problems


def build_graph(model: nn.Module, x: torch.Tensor) -> tuple[tp.DependencyGraph, OpRecords, dict[Any, str]]:
    """torch-pruning's `build_dependency`, with our split / concat fixes before its index mappings."""
    graph = tp.DependencyGraph()
    graph.verbose = False
    graph.model = model
    graph._module2name = {module: name for name, module in model.named_modules()}
    graph.ignored_params = []
    graph._param_to_name, graph.unwrapped_parameters = graph._detect_unwrapped_parameters(None)
    was_training = model.training
    with torch.enable_grad(), record_ops(model) as records:
        graph.module2node = graph._trace(model, x, raw_forward, output_transform=None)
    model.train(was_training)
    graph._build_dependency(graph.module2node)
    shape_infer.init_shape_information(graph)
    problems = _fix_splits_and_cats(graph, records)
    for node in graph.module2node.values():
        shapes = records.reshapes.get(node.grad_fn) if node.type == OT.RESHAPE else None
        if shapes is not None and regroups_channels(*shapes):
            problems[node] = (f"a reshape {list(shapes[0])} -> {list(shapes[1])} that regroups the channel axis "
                              "(a channel shuffle) or splits it into branches (selective-kernel attention)")
            node.type = OT.ELEMENTWISE  # torch-pruning re-runs its mappings for every group: skip this node there
    _update_index_mappings(graph, problems)
    return graph, records, problems


_INDEX_MAPPERS = {OT.CONCAT: index_mapping.update_concat_index_mapping, OT.SPLIT: index_mapping.update_split_index_mapping,
                  OT.RESHAPE: index_mapping.update_reshape_index_mapping,
                  OT.UNBIND: index_mapping.update_unbind_index_mapping,
                  OT.EXPAND: index_mapping.update_expand_index_mapping, OT.SLICE: index_mapping.update_slice_index_mapping}


def _update_index_mappings(graph: tp.DependencyGraph, problems: dict[Any, str]) -> None:
    """torch-pruning's `update_index_mapping`, node by node: a node whose channel mapping it cannot work out
    (a reshape that regroups the channel axis, as a channel shuffle does, divides by zero there) makes the units
    through it unprunable, with the reason, instead of failing the whole model."""
    for node in list(graph.module2node.values()):
        mapper = _INDEX_MAPPERS.get(node.type)
        if mapper is None:
            continue
        try:
            mapper(graph, node)
        except (ZeroDivisionError, ValueError, IndexError, TypeError, AttributeError, RuntimeError) as exc:
            kind = {OT.RESHAPE: "reshape/view"}.get(node.type, str(node.type).split(".")[-1].lower())
            problems[node] = (f"a {kind} of the channel axis whose index mapping torch-pruning cannot work out "
                              f"({type(exc).__name__}; e.g. a channel shuffle)")
            node.type = OT.ELEMENTWISE  # torch-pruning re-runs its mappings for every group: skip this node there


def sync_split_sizes(graph: tp.DependencyGraph, records: OpRecords) -> None:
    """After a prune: entries past the real parts of an equal chunk follow the (equal) part size."""
    for node in graph.module2node.values():
        rec = records.splits.get(node.grad_fn) if node.type == OT.SPLIT else None
        if rec is not None and rec.on_channels and rec.equal_chunks and node.module.split_sizes:
            parts = len(rec.sizes)
            sizes = node.module.split_sizes
            node.module.split_sizes = sizes[:parts] + [sizes[parts - 1]] * (len(sizes) - parts)


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Channel-mixing layers whose outputs reach the model output with no other mixing layer between."""
    found = []
    for module, node in graph.module2node.items():
        if node.type not in (OT.CONV, OT.LINEAR):
            continue
        if not node.outputs:  # the layer's own output is a model output
            found.append(module)
            continue
        stack, seen = list(node.outputs), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.type in MIXING:
                continue
            if n.type == OT.OUTPUT or not n.outputs:
                found.append(module)
                break
            stack.extend(n.outputs)
    return found


_BASE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear)


def own_forward(module: Any) -> bool:
    """True for a conv / linear subclass with its own forward (e.g. timm's ScaledStdConv2d, which standardizes
    each output row of its weight over the inputs): what it computes from its weight is not known, so removing
    its input channels is not checked exactly and no constant is folded into it."""
    for base in _BASE_LAYERS:
        if isinstance(module, base):
            return type(module).forward is not base.forward
    return False


def extra_out_tensors(module: Any) -> list[str]:
    """Own parameters / buffers of a conv or linear layer, besides weight and bias, with one entry per output
    channel (dim 0): e.g. the `gain` of timm's ScaledStdConv2d. torch-pruning prunes only weight and bias, so
    `compress.prune.core` cuts these itself."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return []
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [n for n, t in tensors if n not in ("weight", "bias") and t is not None and t.dim() >= 1
            and t.shape[0] == out and out > 1]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """timm-style multi-head attention blocks (fused qkv projection, per-head reshape, output projection)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)}


# ----------------------------------------------------------------------------------------------------
# Units.


def _node_name(graph: tp.DependencyGraph, node: Any) -> str | None:
    module = node.module
    if node.type == OT.PARAMETER:
        return graph._param_to_name.get(module)
    return graph._module2name.get(module)


def _union_find_ties(size: int, pairs: list[np.ndarray]) -> np.ndarray | None:
    """Tie classes from arrays of elements that must share a fate (None when nothing is tied)."""
    if not pairs:
        return None
    parent = np.arange(size)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for group in pairs:
        first = find(int(group[0]))
        for e in group[1:]:
            parent[find(int(e))] = first
    roots = np.array([find(i) for i in range(size)])
    _, classes = np.unique(roots, return_inverse=True)
    return classes.astype(np.int64)


def _unit_from_group(graph: tp.DependencyGraph, group: Any, root_module: nn.Module, root_fn: Callable,
                     split_problems: dict[Any, str], records: OpRecords, ignore: list[re.Pattern],
                     outputs: set[str], qkv: dict[str, str], shared: Sequence[np.ndarray] = ()) -> Unit:
    root_name = graph._module2name[root_module]
    size = graph.get_out_channels(root_module)
    members: list[Member] = []
    reason: str | None = None
    exact = True
    tie_sets: list[np.ndarray] = list(shared)
    balance: list[np.ndarray] = []
    bn_carriers: list[tuple[str, np.ndarray, np.ndarray]] = []
    producers: list[tuple[str, np.ndarray, np.ndarray]] = []

    def refuse(why: str) -> None:
        nonlocal reason
        reason = reason or why

    for item in group:
        dep, idxs = item.dep, item.idxs
        node = dep.target
        local = np.asarray(idxs, dtype=np.int64)
        root = np.asarray(item.root_idxs, dtype=np.int64)
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if node.type == OT.OUTPUT:
            refuse("its channels reach the model output")
            continue
        if node.type == OT.SPLIT:
            why = split_problems.get(node)
            rec = records.splits.get(node.grad_fn)
            if why:
                refuse(why)
            elif rec is not None and rec.on_channels and rec.equal_chunks:
                offsets = np.cumsum([0] + rec.sizes)
                parts = []
                for k in range(len(rec.sizes)):
                    sel = (local >= offsets[k]) & (local < offsets[k + 1])
                    parts.append(root[sel][np.argsort(local[sel])])
                if len({len(p) for p in parts}) == 1 and len(parts[0]) > 0:
                    balance.append(np.stack(parts))
                elif any(len(p) for p in parts):
                    refuse(f"a chunk in {rec.module or 'the model'} whose parts are coupled unevenly")
            continue
        if node.type == OT.SLICE:
            if getattr(node.module, "dim", None) in (1, 2):
                refuse("a channel slice (x[:, a:b]) in the model's code")
            continue
        if node.type == OT.UNBIND:
            refuse("torch.unbind on these channels (attention-style reshape)")
            continue
        if node.type == OT.EXPAND:
            refuse("an expand/repeat of these channels")
            continue
        if node.type != OT.SPLIT and split_problems.get(node):  # a node whose channel mapping is unknown
            refuse(split_problems[node])
            continue
        if node.type not in WEIGHTED:
            continue
        name = _node_name(graph, node)
        if name is None:
            continue
        dim = "out" if is_out else "in"
        members.append(Member(name, dim, local, root, int(node.type)))
        module = node.module
        if node.type in CHANNEL_STATS or (dim == "in" and own_forward(module)):
            exact = False
        if node.type == OT.GN:
            refuse(f"GroupNorm {name} (removing channels would regroup its normalisation)")
        if dim == "out" and node.type in (OT.CONV, OT.LINEAR, OT.DEPTHWISE_CONV):
            if matches(name, ignore):
                refuse(f"layer {name} is ignored")
            if name in outputs:
                refuse(f"layer {name} produces a model output")
            if name in qkv:
                refuse(f"{name} is the qkv projection of attention {qkv[name]} (pruned by whole heads)")
            if node.type != OT.DEPTHWISE_CONV:
                producers.append((name, local, root))
        if node.type == OT.BN and getattr(module, "affine", False):
            bn_carriers.append((name, local, root))
        if node.type == OT.CONV and module.groups > 1:
            # grouped (not depthwise) conv: the same position in every group is kept or removed together
            channels = module.out_channels if dim == "out" else module.in_channels
            per_group = channels // module.groups
            for pos in range(per_group):
                tied = root[(local % per_group) == pos]
                if len(tied) > 1:
                    tie_sets.append(np.unique(tied))
    if len(tie_sets) > len(shared) and balance:
        refuse("a chunk feeding a grouped convolution")
    ties = _union_find_ties(size, tie_sets)
    carriers = [_carrier(n, "gamma", l, r) for n, l, r in bn_carriers] or \
               [_carrier(n, "magnitude", l, r) for n, l, r in producers]
    if not carriers:
        refuse("no BatchNorm and no weights to score its channels")
    return Unit(root_name, "channels", size, members, carriers, ties, balance, reason, exact,
                root_module, root_fn)


def _carrier(name: str, kind: str, local: np.ndarray, root: np.ndarray) -> Carrier:
    roots = np.unique(root)
    locals_ = [local[root == r] for r in roots]
    return Carrier(name, kind, roots, locals_)


@contextlib.contextmanager
def _shared_channels() -> Iterator[list[tuple[int, int]]]:
    """Record the root elements that reach the same channel of some layer while torch-pruning builds a group.

    torch-pruning merges the indices a walk brings to one layer by channel and keeps the first root element of
    each, so two root elements that share a channel look independent in the group (GhostNet: a conv's output and
    the depthwise "cheap" conv on it are concatenated; root j and root j + C/2 both reach the conv's channel j).
    Removing one of them removes that channel and, through the walk, the other one too: such elements are tied.
    Yields the list of (root a, root b) pairs found, filled while the context is open."""
    from torch_pruning.dependency.group import Group

    pairs: list[tuple[int, int]] = []
    original = Group.add_and_merge

    def add_and_merge(self: Any, dep: Any, idxs: Any) -> None:
        seen: dict[int, Any] = {}
        for _dep, _idxs in self._group:
            if _dep.target == dep.target and _dep.handler == dep.handler:
                seen = {i.idx: i.root_idx for i in _idxs}
                break
        for i in idxs:
            first = seen.setdefault(i.idx, i.root_idx)
            if first is not None and i.root_idx is not None and first != i.root_idx:
                pairs.append((int(first), int(i.root_idx)))
        original(self, dep, idxs)

    Group.add_and_merge = add_and_merge
    try:
        yield pairs
    finally:
        Group.add_and_merge = original


class GroupWalkError(RuntimeError):
    """torch-pruning's walk of a group maps channels to more indices than any layer of the model has."""


@contextlib.contextmanager
def _bounded_walk(limit: int, max_items: int) -> Iterator[None]:
    """Within the block, torch-pruning's group walk raises GroupWalkError when a flatten index mapping yields more
    than `limit` indices or the group gets more than `max_items` entries.

    torch-pruning reads a reshape between channels and (heads, head_dim) as a flatten with stride head_dim; where
    such mappings form a cycle (torchvision's Swin: the relative-position bias expanded over the heads and added to
    the attention), each pass multiplies the index set by the stride (2 -> 64 -> 2,048 -> 65,536 -> 2 M indices on
    swin_t) and the walk never ends. A real flatten never yields more indices than the widest layer has. Split /
    concat offsets in a cycle (timm's CoaT, its convolutional position encoding) instead keep adding shifted index
    sets: over 30,000 entries in 90 s, each checked against all before it, where the largest walk of swin_t,
    densenet121 or vit_tiny has 3.1x its graph's node count or less."""
    from torch_pruning.dependency.group import Group

    flatten_call, add_dep = index_mapping._FlattenIndexMapping.__call__, Group.add_dep
    added = [0]

    def bounded_flatten(self: Any, idxs: Any) -> Any:
        out = flatten_call(self, idxs)
        if len(out) > limit:
            raise GroupWalkError(f"the walk cycles through a reshape ({len(out):,} indices, widest layer {limit:,})")
        return out

    def bounded_add(self: Any, dep: Any, idxs: Any) -> Any:
        added[0] += 1
        if added[0] > max_items:
            raise GroupWalkError(f"the walk cycles through split / concat offsets (over {max_items:,} entries)")
        return add_dep(self, dep, idxs)

    index_mapping._FlattenIndexMapping.__call__, Group.add_dep = bounded_flatten, bounded_add
    try:
        yield
    finally:
        index_mapping._FlattenIndexMapping.__call__, Group.add_dep = flatten_call, add_dep


def _widest(model: nn.Module) -> int:
    """The largest size of any dimension of any parameter: no real channel index reaches it."""
    return max((max(p.shape) for p in model.parameters() if p.dim() > 0), default=1)


def _walk_bounds(graph: tp.DependencyGraph) -> tuple[int, int]:
    """`_bounded_walk`'s limits for this graph: the widest layer, and 8x its node count (at least 2,000)."""
    return _widest(graph.model), max(8 * len(graph.module2node), 2000)


def _full_group(graph: tp.DependencyGraph, module: nn.Module, bounds: tuple[int, int]
                ) -> tuple[Any, list[np.ndarray]]:
    """The group of all of `module`'s output channels, re-rooted at a layer the group covers only in part
    (e.g. the conv before a `chunk`, when the walk started from one part), so the unit is complete; with the
    pairs of root elements that share a channel somewhere in the group (`_shared_channels`). `bounds`: the walk's
    limits (`_walk_bounds`)."""
    for _ in range(4):
        pruner = graph.get_pruner_of_module(module)
        with _shared_channels() as pairs, _bounded_walk(*bounds):
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
        partial = None
        for item in group:
            target = item.dep.target
            if target.type in (OT.CONV, OT.LINEAR) and graph.is_out_channel_pruning_fn(item.dep.handler):
                if len(set(item.idxs)) < graph.get_out_channels(target.module):
                    partial = target.module
                    break
        if partial is None:
            break
        module = partial
    return group, [np.array(sorted(p), dtype=np.int64) for p in dict.fromkeys(pairs)]


def analyze(model: nn.Module, x: torch.Tensor, ignore: Sequence[str] = (), protect_outputs: bool = True,
            assigner: GroupAssigner | None = None) -> Analysis:
    """Trace `model` on `x` (a batch) and find its units, their carriers and their groups."""
    assigner = assigner or GroupAssigner()
    layers = trace_layers(model, x)
    graph, records, split_problems = build_graph(model, x)
    outs = output_layers(graph) if protect_outputs else []
    out_names = {graph._module2name[m] for m in outs}
    attentions = attention_modules(model)
    qkv = {f"{name}.qkv" if name else "qkv": name for name in attentions}
    patterns = [compile_pattern(p) for p in ignore]
    skip_roots = set(outs) | {m.qkv for m in attentions.values()}
    bounds = _walk_bounds(graph)
    units: list[Unit] = []
    visited: set[nn.Module] = set()
    for module, node in list(graph.module2node.items()):
        if node.type not in (OT.CONV, OT.DEPTHWISE_CONV, OT.LINEAR) or module in visited or module in skip_roots:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group, shared = _full_group(graph, module, bounds)
        except (ZeroDivisionError, IndexError, ValueError, TypeError, RuntimeError) as exc:
            # torch-pruning's own index mapping fails while walking this layer's group (lambda_resnet26t: its
            # expand mapping divides by a head_dim of 0): the layer keeps its channels, the rest is still pruned
            name = graph._module2name[module]
            units.append(Unit(name, "channels", pruner.get_out_channels(module) or 0, [], [],
                              reason=f"torch-pruning cannot walk the channels of {name} "
                                     f"({type(exc).__name__}: {str(exc)[:80]})"))
            visited.add(module)
            continue
        module = group[0].dep.target.module
        pruner = graph.get_pruner_of_module(module)
        for item in group:
            if graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
                visited.add(item.dep.target.module)
        units.append(_unit_from_group(graph, group, module, pruner.prune_out_channels, split_problems, records,
                                      patterns, out_names, qkv, shared))
    for module in outs:  # listed (not analysed: their groups are the slow ones) so reports can name them
        if module not in visited:
            name = graph._module2name[module]
            units.append(Unit(name, "channels", graph.get_out_channels(module) or 0, [], [],
                              reason=f"layer {name} produces a model output"))
    units.extend(head_units(model, attentions, patterns))
    for unit in units:
        _refuse_out_of_range(unit, model)
        for carrier in unit.carriers:
            info = layers.get(carrier.name)
            carrier.stride = info.stride if info else None
            carrier.group = assigner(carrier.name, carrier.stride)
    analysis = Analysis(model, x, graph, layers, units, sorted(out_names), records)
    score_carriers(analysis)
    return analysis


def _refuse_out_of_range(unit: Unit, model: nn.Module) -> None:
    """A unit whose mapped channel indices fall outside a layer it cuts was mapped wrongly by torch-pruning (a
    reshape or permutation of the channel axis, e.g. a channel shuffle): it stays whole, its carriers dropped."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for member in unit.members:
        target = modules.get(member.module, params.get(member.module))
        if target is None or not len(member.local):
            continue
        try:
            size = _dim_size_of(target, member.dim)
        except ValueError:
            continue
        if int(member.local.max()) >= size or int(member.local.min()) < 0:
            unit.reason = unit.reason or (f"channel indices mapped outside {member.module} ({size} channels): a "
                                          "reshape or permutation of the channel axis (e.g. a channel shuffle)")
            unit.carriers = []
            return


def _dim_size_of(target: nn.Module | nn.Parameter, dim: str) -> int:
    if isinstance(target, nn.Parameter):
        return int(target.shape[0])
    if isinstance(target, nn.modules.conv._ConvNd):
        return target.out_channels if dim == "out" else target.in_channels
    if isinstance(target, nn.Linear):
        return target.out_features if dim == "out" else target.in_features
    if isinstance(target, nn.modules.batchnorm._NormBase):
        return target.num_features
    raise ValueError(type(target).__name__)


# ----------------------------------------------------------------------------------------------------
# Scores.


@torch.no_grad()
def score_carriers(analysis: Analysis) -> None:
    """Fill `carrier.score`: |gamma| for BN carriers; for the magnitude fallback, the L2 norm of the
    weights an element owns in the carrier, divided by the carrier's mean (unitless, ~1)."""
    modules = dict(analysis.model.named_modules())
    for unit in analysis.units:
        for c in unit.carriers:
            module = modules[c.name]
            if c.kind == "gamma":
                w = module.weight.detach().abs().double().cpu().numpy()
                c.score = np.array([w[loc].mean() for loc in c.locals])
            else:
                w = module.weight.detach().double().cpu()
                if isinstance(module, nn.modules.conv._ConvTransposeNd):
                    w = w.transpose(0, 1)
                rows = w.reshape(w.shape[0], -1).norm(dim=1).numpy()
                s = np.array([np.sqrt((rows[loc] ** 2).sum()) for loc in c.locals])
                c.score = s / max(s.mean(), 1e-12)
