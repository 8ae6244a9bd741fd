"""Whole-head pruning of timm-style attention (torch-pruning cannot cut a fused qkv projection).

timm's `Attention` computes `qkv = self.qkv(x).reshape(B, N, 3, num_heads, head_dim)` and, after the
attention, `x.reshape(B, N, attn_dim)` -> `self.proj`. Row `s * attn_dim + h * head_dim + j` of the qkv
weight is component s (q, k, v) of head h, dimension j; column `h * head_dim + j` of `proj` reads it back.
Removing head h removes those 3 * head_dim rows and head_dim columns and lowers `num_heads` / `attn_dim`;
`head_dim` and the softmax scale stay, so the kept heads compute exactly what they computed before.
Head importance (no BatchNorm in a ViT): the L2 norm of the head's qkv rows (magnitude fallback).
We do not shrink `head_dim`: the fused kernel derives its scale from it.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

from compress.prune.groups import matches
from compress.prune.units import Carrier, Member, Unit


def _layout_problem(attn: nn.Module) -> str | None:
    heads, head_dim = attn.num_heads, getattr(attn, "head_dim", None)
    attn_dim = getattr(attn, "attn_dim", None)
    if not isinstance(head_dim, int) or not isinstance(attn_dim, int):
        return "no integer head_dim / attn_dim attributes"
    if attn_dim != heads * head_dim or attn.qkv.out_features != 3 * attn_dim or attn.proj.in_features != attn_dim:
        return f"qkv {attn.qkv.out_features} / proj {attn.proj.in_features} do not match 3 x {heads} heads x {head_dim}"
    for extra in ("norm",):
        sub = getattr(attn, extra, None)
        if sub is not None and not isinstance(sub, (nn.Identity, nn.LayerNorm)):
            return f"{extra} is a {type(sub).__name__}"
    gate = getattr(attn, "gate", None)
    if gate is not None and not isinstance(gate, nn.Linear):
        return f"gate is a {type(gate).__name__}"
    return None


def head_rows(attn: nn.Module, heads: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(qkv rows, proj columns) of `heads`, each with the head of every index: int64 [3*k*hd], [k*hd]."""
    hd, dim = attn.head_dim, attn.attn_dim
    rows = np.array([s * dim + h * hd + j for s in range(3) for h in heads for j in range(hd)], dtype=np.int64)
    cols = np.array([h * hd + j for h in heads for j in range(hd)], dtype=np.int64)
    return rows, cols


def head_units(model: nn.Module, attentions: dict[str, nn.Module], ignore: list[re.Pattern]) -> list:
    """One "heads" unit per attention block (elements = heads)."""
    units = []
    for name, attn in attentions.items():
        prefix = f"{name}." if name else ""
        heads = attn.num_heads
        problem = _layout_problem(attn)
        if problem is not None:
            units.append(Unit(f"{name}#heads", "heads", heads, [], [], reason=f"attention {name}: {problem}",
                              attention=name))
            continue
        hd = attn.head_dim
        rows, cols = head_rows(attn, list(range(heads)))
        row_head = (rows % attn.attn_dim) // hd
        col_head = cols // hd
        members = [Member(prefix + "qkv", "out", rows, row_head), Member(prefix + "proj", "in", cols, col_head)]
        if isinstance(getattr(attn, "norm", None), nn.LayerNorm):
            members.append(Member(prefix + "norm", "out", cols, col_head))
        if isinstance(getattr(attn, "gate", None), nn.Linear):
            members.append(Member(prefix + "gate", "out", cols, col_head))
        carrier = Carrier(prefix + "qkv", "magnitude", np.arange(heads), [rows[row_head == h] for h in range(heads)])
        reason = f"attention {name} is ignored" if matches(prefix + "qkv", ignore) or matches(name, ignore) else None
        units.append(Unit(f"{name}#heads", "heads", heads, members, [carrier], reason=reason, attention=name))
    return units


@torch.no_grad()
def prune_heads(attn: nn.Module, remove: list[int]) -> None:
    """Remove the listed heads from a timm-style attention module in place."""
    keep = [h for h in range(attn.num_heads) if h not in set(remove)]
    rows, cols = head_rows(attn, keep)
    rows_t = torch.as_tensor(rows, device=attn.qkv.weight.device)
    cols_t = torch.as_tensor(cols, device=attn.qkv.weight.device)
    _select_linear(attn.qkv, rows_t, None)
    _select_linear(attn.proj, None, cols_t)
    if isinstance(getattr(attn, "gate", None), nn.Linear):
        _select_linear(attn.gate, cols_t, None)
    norm = getattr(attn, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight[cols_t].clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias[cols_t].clone())
        norm.normalized_shape = (len(cols),)
    attn.num_heads = len(keep)
    attn.attn_dim = len(keep) * attn.head_dim


def _select_linear(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    weight = layer.weight
    if rows is not None:
        weight = weight[rows]
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows].clone())
        layer.out_features = len(rows)
    if cols is not None:
        weight = weight[:, cols]
        layer.in_features = len(cols)
    layer.weight = nn.Parameter(weight.clone())
