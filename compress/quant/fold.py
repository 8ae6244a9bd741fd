"""Folding BatchNorm into the convolution before quantizing, without changing the model's structure.

A conv followed by a BatchNorm in inference computes y = s * (W x + b - mu) + beta with s = gamma / sqrt(var +
eps) per output channel. Quantizing W alone measures the error before the BN, so channels that the BN
amplifies (a large s, typical of depthwise convs over nearly constant inputs) get no more care than the
others. Folding gives the conv W' = s * W and leaves the BN as a plain per-channel bias (mean 0, variance
1 - eps, weight 1, bias beta + s * (b - mu)): the model computes the same function with the same modules and
parameter shapes (so artifacts, pruning manifests and loaders are unchanged), and the quantizer now sees
the weights as they act on the output.

Pairs come from a torch.fx trace (the conv's output has one user, the BN), or, for models fx cannot trace,
from a conv followed by a BN in an nn.Sequential; a run on a batch confirms each (the BN reads the conv's
output tensor; each is called once). A conv output also used elsewhere is never folded (it would change there).
Only Conv1d/2d/3d (not transposed) followed by an affine BN with running statistics are folded.

At export (`remove_batchnorms`) the BNs are then removed for inference: their bias moves into the conv and the
BN becomes nn.Identity, recorded as `model_meta["bn_fold"]` so a reader rebuilds the same folded model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.format.restorers import FOLD_CONVS, FOLD_NORMS
from compress.models.protocol import eval_forward_with_hooks, flat_tensors, map_tensors, raw_outputs

__all__ = ["find_conv_bn_pairs", "fold_batchnorm", "remove_batchnorms", "fuse_plain_biases", "unfuse_plain_biases"]


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer that also keeps quantized layers (stock classes with a compact weight) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(type(m), "_quant_base") or super().is_leaf_module(m, qualname)


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Pairs from a torch.fx trace: a conv node whose one user is a BN module (None: not traceable)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001  (any model torch.fx cannot trace falls back to module order)
        return None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), FOLD_CONVS) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules.get(user.target), FOLD_NORMS):
            pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of a conv directly followed by a BN inside an nn.Sequential (the conv's output goes to the BN only)."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if isinstance(conv, FOLD_CONVS) and isinstance(bn, FOLD_NORMS):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def _autograd_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """Pairs from one forward with autograd on (for models torch.fx cannot trace): a BN whose input is a conv's
    output tensor, where that tensor's autograd node feeds exactly one other node (the BN's) in the graph
    behind the model's outputs, so nothing else reads the conv's output."""
    modules = dict(model.named_modules())
    made: dict[str, Any] = {}
    read: dict[str, Any] = {}
    handles = []
    # autograd nodes are taken when each module returns: an in-place op afterwards (SiLU(inplace=True)) moves a
    # tensor's grad_fn on
    for name, module in modules.items():
        if isinstance(module, FOLD_CONVS):
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, name=name: made.setdefault(name, []).append(
                    (out, out.grad_fn if torch.is_tensor(out) else None))))
        elif isinstance(module, FOLD_NORMS):
            handles.append(module.register_forward_hook(
                lambda _m, args, out, name=name: read.setdefault(name, []).append(
                    (args[0] if args and torch.is_tensor(args[0]) else None,
                     args[0].grad_fn if args and torch.is_tensor(args[0]) else None,
                     out.grad_fn if torch.is_tensor(out) else None))))
    inputs = map_tensors(batch, lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t)
    with torch.enable_grad(), raw_outputs(model):
        outputs = eval_forward_with_hooks(model, inputs, handles)
    # how many edges of the autograd graph behind the outputs lead into each node
    edges: dict[Any, int] = {}
    seen, stack = set(), [t.grad_fn for t in flat_tensors(outputs) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                edges[parent] = edges.get(parent, 0) + 1
                stack.append(parent)
    by_node = {outs[0][1]: name for name, outs in made.items() if len(outs) == 1 and outs[0][1] is not None}
    pairs = []
    for bn, calls in read.items():
        if len(calls) != 1:
            continue
        _, in_node, out_node = calls[0]
        if in_node in by_node and edges.get(in_node) == 1 and out_node in seen \
                and any(parent is in_node for parent, _ in out_node.next_functions):
            pairs.append((by_node[in_node], bn))
    return pairs


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """(conv name, BN name) of every BN that reads a conv's output which nothing else reads: from a torch.fx
    trace of the model, else (not traceable) from the autograd graph of one forward, else from convs followed
    by a BN in an nn.Sequential; each pair is also checked on `batch` (the BN's input is the conv's output
    tensor, each called once)."""
    candidates = _fx_pairs(model)
    if candidates is None:
        candidates = _autograd_pairs(model, batch) or _sequential_pairs(model)
    produced: dict[str, list[int]] = {}
    read: dict[str, list[int]] = {}
    keep: list[torch.Tensor] = []  # tensors stay alive during the pass, so their ids are not reused
    handles = []
    modules = dict(model.named_modules())
    for conv, bn in candidates:
        def post(_m: nn.Module, _a: tuple, out: Any, name: str = conv) -> None:
            produced.setdefault(name, []).append(id(out))
            keep.append(out)

        def pre(_m: nn.Module, args: tuple, name: str = bn) -> None:
            read.setdefault(name, []).append(id(args[0]) if args else -1)
            keep.extend(a for a in args if torch.is_tensor(a))

        handles += [modules[conv].register_forward_hook(post), modules[bn].register_forward_pre_hook(pre)]
    eval_forward_with_hooks(model, batch, handles)
    pairs = []
    for conv, bn in candidates:
        c, b = modules[conv], modules[bn]
        if len(produced.get(conv, [])) != 1 or produced[conv] != read.get(bn):
            continue
        if b.num_features == c.out_channels and b.affine and b.running_var is not None:
            pairs.append((conv, bn))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """Fold every conv -> BN pair of `model` (found on `batch`) in place; returns the pairs folded."""
    pairs = find_conv_bn_pairs(model, batch)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma, beta = bn.weight.double(), bn.bias.double()
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = beta - scale * mean
        if conv.bias is not None:
            bias = bias + scale * conv.bias.double()
            conv.bias.zero_()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * scale.view(shape)).to(conv.weight.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias.to(bn.bias.dtype))
    return pairs


def is_plain_bias(bn: nn.Module) -> bool:
    """A BN that `fold_batchnorm` left as a per-channel bias: mean 0, weight 1 and var + eps == 1 in its dtype."""
    one = (bn.running_var + bn.eps).eq(1.0).all()
    return bool(one and bn.running_mean.eq(0).all() and bn.weight.eq(1).all())


_SAVED_BIAS = "_compress_saved_bias"


def _pass_through(x: torch.Tensor) -> torch.Tensor:
    return x


def fuse_plain_biases(model: nn.Module, pairs: list[tuple[str, str]]) -> int:
    """For the sensitivity passes: each folded BN of `pairs` that is still a plain bias (in eval mode, after a
    conv with no bias or a zero one) passes its input through, and its conv adds the bias instead (a plain
    tensor, not a parameter, so nothing counted or stored changes): one pass over each activation less. The
    outputs are the same on channels-last CPU convs (oneDNN adds the bias after summing, as x + beta does; the
    layout of the sensitivity scope) and equal up to rounding otherwise (NCHW kernels may start the sum from
    the bias), which the ranking of layers by sensitivity does not feel (compress.models.memory_format). Undone
    by `unfuse_plain_biases` (also on a deepcopy made meanwhile). Returns the pairs fused."""
    modules = dict(model.named_modules())
    fused = 0
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if conv is None or bn is None or bn.training or "bias" not in conv._parameters or _SAVED_BIAS in conv.__dict__:
            continue
        own = conv._parameters["bias"]
        if not is_plain_bias(bn) or (own is not None and bool(own.ne(0).any())):
            continue
        conv.__dict__[_SAVED_BIAS] = conv._parameters.pop("bias")
        conv.__dict__["bias"] = bn.bias.detach()
        bn.__dict__["forward"] = _pass_through
        fused += 1
    return fused


def unfuse_plain_biases(model: nn.Module) -> None:
    """Undo `fuse_plain_biases`: the convs get their own bias back and the BNs their forward."""
    for module in model.modules():
        if _SAVED_BIAS in module.__dict__:
            del module.__dict__["bias"]
            module._parameters["bias"] = module.__dict__.pop(_SAVED_BIAS)
        if module.__dict__.get("forward") is _pass_through:
            del module.__dict__["forward"]


@torch.no_grad()
def remove_batchnorms(model: nn.Module, batch: Any) -> list[list[str]]:
    """Fold every conv -> BN pair of `model` (found on `batch`) into the conv for inference and replace the BN
    with nn.Identity, in place; returns the [conv, BN] pairs removed (what `model_meta["bn_fold"]` records).

    A float conv absorbs any BN (W' = s W, b' = s (b - mu) + beta, computed in float64). A quantized conv keeps
    its stored weight, so only a BN that `fold_batchnorm` already reduced to a bias (s == 1, mu == 0) goes into
    it; any other BN after a quantized conv stays (folding it would change the stored codes)."""
    removed = []
    modules = dict(model.named_modules())
    for conv_name, bn_name in find_conv_bn_pairs(model, batch):
        conv, bn = modules[conv_name], modules[bn_name]
        plain = is_plain_bias(bn)
        if hasattr(conv, "quant_layout") and not plain:
            continue
        beta = bn.bias.double()
        if plain:
            bias = beta + (conv.bias.double() if conv.bias is not None else 0.0)
        else:
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(beta)
            bias = beta + scale * (conv_bias - bn.running_mean.double())
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            conv.weight.copy_((conv.weight.double() * scale.view(shape)).to(conv.weight.dtype))
        dtype = bn.bias.dtype
        conv.bias = nn.Parameter(bias.to(dtype))
        model.set_submodule(bn_name, nn.Identity())
        removed.append([conv_name, bn_name])
    return removed
