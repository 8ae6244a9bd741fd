"""Folding BatchNorm into the convolution before quantizing, without changing the model's structure.

A conv followed by a BatchNorm in inference computes y = s * (W x + b - mu) + beta with s = gamma / sqrt(var +
eps) per output channel. Quantizing W alone measures the error before the BN, so channels that the BN
amplifies (a large s, typical of depthwise convs over nearly constant inputs) get no more care than the
others. Folding gives the conv W' = s * W and leaves the BN as a plain per-channel bias (mean 0, variance
1 - eps, weight 1, bias beta + s * (b - mu)): the model computes the same function with the same modules and
parameter shapes (so artifacts, pruning manifests and loaders are unchanged), and the quantizer now sees
the weights as they act on the output.

Pairs are found by running the model once: a BN is folded into a conv when the BN's input is the conv's
output tensor and no other module takes that tensor (a conv output also used elsewhere would change there).
Only Conv1d/2d/3d (not transposed) followed by an affine BN with running statistics are folded.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["find_conv_bn_pairs", "fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """(conv name, BN name) of every BN whose only producer is a conv whose output no other module reads."""
    produced: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # tensors stay alive during the pass, so their ids are not reused
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            def post(_m: nn.Module, _a: tuple, out: Any, name: str = name) -> None:
                if torch.is_tensor(out):
                    produced[id(out)] = name
                    keep.append(out)
            handles.append(module.register_forward_hook(post))
        if name:  # every module that takes a tensor as input, containers included
            def pre(_m: nn.Module, args: tuple, name: str = name) -> None:
                for a in args:
                    if torch.is_tensor(a):
                        readers.setdefault(id(a), []).append(name)
                        keep.append(a)
            handles.append(module.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    pairs, seen_convs, seen_bns = [], set(), set()
    for key, conv in produced.items():
        users = readers.get(key, [])
        if len(users) != 1 or not isinstance(modules[users[0]], _NORMS):
            continue
        bn_name = users[0]
        if conv in seen_convs or bn_name in seen_bns:  # a module called twice: not a fixed pair
            pairs = [p for p in pairs if p[0] != conv and p[1] != bn_name]
            continue
        seen_convs.add(conv)
        seen_bns.add(bn_name)
        c, bn = modules[conv], modules[bn_name]
        if bn.num_features == c.out_channels and bn.affine and bn.running_var is not None:
            pairs.append((conv, bn_name))
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
