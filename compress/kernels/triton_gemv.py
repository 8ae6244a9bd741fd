"""Triton fused dequant-GEMV/GEMM for a quantized Linear at small batch: y = x @ W.T + bias, W never dense.

One program per block of BLOCK_R output rows (times SPLIT_K slices of the columns): it loads its rows' group
codebooks once (into registers for <= 3 bits), then streams the packed indices of its rows in tiles of
BLOCK_C columns, decodes each tile in registers and accumulates in fp32:
- batch 1: acc[BLOCK_R] += sum(w * x, axis=1) per tile;
- batch 2..16: `tl.dot` of the decoded tile (in x's dtype; fp32 x uses IEEE fp32) with x's tile [BLOCK_C, 16].
The column loop is software-pipelined (STAGES loads in flight). With SPLIT_K > 1 the slices add into an fp32
buffer with atomics. The output row of stored row r is
row_order[r] (when given), bias included. Reference: `compress.kernels.reference.gemv_ref`.
Imported lazily (it imports triton).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from compress.kernels.reference import check_quantized
from compress.kernels.triton_common import (INTERPRET, LOOKUP_GLOBAL, LOOKUP_SELECT, cast_to, codebook_registers,
                                            group_args, load_indices, lookup_mode, plane_args, row_groups, select)

__all__ = ["quantized_linear_triton", "quantized_linear_launch", "default_config", "MAX_BATCH"]

MAX_BATCH = 16  # the dot path pads the batch to one 16-wide MMA tile


@triton.jit
def _qlinear_kernel(x_ptr, p_ptr, cb_ptr, gid_ptr, order_ptr, bias_ptr, y_ptr,
                    batch, rows, cols, stride_xb, stride_p, stride_yb, g_num, g_den,
                    off1, off2, nb0, nb1, nb2,
                    K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                    HAS_GID: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                    LOOKUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    g = row_groups(gid_ptr, r, rmask, g_num, g_den, HAS_GID)
    row_ptr = p_ptr + r.to(tl.int64)[:, None] * stride_p
    if LOOKUP == LOOKUP_SELECT:
        k0, k1, k2, k3, k4, k5, k6, k7 = codebook_registers(cb_ptr, g, K)
    elif LOOKUP == LOOKUP_GLOBAL:
        cb_rows = cb_ptr + (g * K)[:, None]
    else:
        table = tl.load(cb_ptr + (g * K)[:, None] + tl.arange(0, K)[None, :]).to(tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    offs_b = tl.arange(0, BLOCK_B)
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    for c0 in tl.range(pid_k * BLOCK_C, cols, BLOCK_C * SPLIT_K, num_stages=STAGES):
        idx = load_indices(row_ptr, rmask, c0, off1, off2, nb0, nb1, nb2, BLOCK_C, W0, W1, W2)
        if LOOKUP == LOOKUP_SELECT:
            w = select(idx, k0, k1, k2, k3, k4, k5, k6, k7, K)
        elif LOOKUP == LOOKUP_GLOBAL:
            w = tl.load(cb_rows + idx).to(tl.float32)
        else:
            w = tl.gather(table, idx, 1)
        c = c0 + offs_c
        cmask = c < cols
        if BLOCK_B == 1:
            xv = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            # reduced every tile: a [BLOCK_R] carry keeps the decoded tile in the layout the unpacking made
            acc += tl.sum(w * xv[None, :], axis=1)
        else:
            xt = tl.load(x_ptr + offs_b[None, :] * stride_xb + c[:, None],
                         mask=cmask[:, None] & (offs_b < batch)[None, :], other=0.0)
            if DOT == 0:  # MMA in x's dtype (fp16 / bf16), fp32 accumulator
                acc = tl.dot(w.to(xt.dtype), xt, acc)
            elif DOT == 1:  # fp32 x: IEEE fp32, no tf32 rounding
                acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
            else:  # the interpreter's bf16 dot is wrong: the same rounding of w, products in fp32
                acc = tl.dot(cast_to(w, xt.dtype).to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    if BLOCK_B == 1:
        y = acc[:, None]  # [BLOCK_R, 1]
    else:
        y = acc
    if HAS_ORDER:
        out_r = tl.load(order_ptr + r, mask=rmask, other=0)
    else:
        out_r = r
    if HAS_BIAS:
        bias = tl.load(bias_ptr + out_r, mask=rmask, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        y += bias[:, None]
    y_ptrs = y_ptr + offs_b[None, :] * stride_yb + out_r[:, None]
    ymask = rmask[:, None] & (offs_b < batch)[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, y, mask=ymask)
    else:
        tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty), mask=ymask)


def _dot_mode(dtype: torch.dtype) -> int:
    """0: MMA in fp16/bf16; 1: IEEE fp32 (fp32 x); 2: bf16 under the interpreter, whose `tl.dot` multiplies the
    raw uint16 storage of bf16 (triton 3.8 interpreter), so it rounds w to bf16 and multiplies in fp32."""
    if dtype == torch.float32:
        return 1
    return 2 if dtype == torch.bfloat16 and INTERPRET else 0


def default_config(batch: int, rows: int, cols: int, bits: int) -> dict[str, int]:
    """Tile and launch defaults, chosen from sm_90 SASS (instructions an element, no spills) and ~4 programs an
    SM for 4096-row layers; not yet timed on a GPU (`tools/bench_kernels.py --sweep` does)."""
    if batch == 1:
        block_r, block_c = (8, 512) if bits <= 3 else (4, 1024)
        block_r = min(block_r, triton.next_power_of_2(max(rows, 1)))
        block_c = min(block_c, max(16, triton.next_power_of_2(cols)))
    else:  # tl.dot needs every tile dim >= 16
        block_r, block_c = 16, min(256, max(16, triton.next_power_of_2(cols)))
    return {"block_r": block_r, "block_c": block_c, "split_k": 1, "stages": 3, "num_warps": 4}


def quantized_linear_triton(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int,
                            *, groups: torch.Tensor | None = None, group_size: int | None = None,
                            row_order: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            **config: Any) -> torch.Tensor:
    """x [B, cols] (B <= 16) @ W.T + bias -> [B, rows] in x's dtype; W is decoded tile by tile in registers.

    config: lookup, block_r, block_c, split_k, stages, num_warps: override `default_config` (for benchmarks).
    """
    grid, args, meta, y = quantized_linear_launch(x, packed, codebooks, bits, cols, groups=groups,
                                                  group_size=group_size, row_order=row_order, bias=bias, **config)
    if y.numel():
        _qlinear_kernel[grid](*args, **meta)
    return y.to(x.dtype)


def quantized_linear_launch(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int,
                            *, groups: torch.Tensor | None = None, group_size: int | None = None,
                            row_order: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            lookup: str | None = None, **config: int
                            ) -> tuple[tuple[int, int], tuple, dict[str, Any], torch.Tensor]:
    """(grid, args, constexprs + launch options, y) of `_qlinear_kernel` (also used to compile it ahead).

    y is [B, rows] in x's dtype, or fp32 zeros when split_k > 1 (the column slices add into it).
    """
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    if x.dim() != 2 or x.shape[1] != cols or x.shape[0] > MAX_BATCH:
        raise ValueError(f"x must be [B <= {MAX_BATCH}, {cols}] (got {tuple(x.shape)}); larger batches: "
                         "dequantize once and use F.linear")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32 (got {x.dtype})")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device}, the weight on {packed.device}")
    if bias is not None and (bias.shape != (rows,) or bias.device != x.device):
        raise ValueError(f"bias must be [{rows}] on {x.device} (got {tuple(bias.shape)} on {bias.device})")
    batch = x.shape[0]
    mode = lookup_mode(bits, lookup)
    cfg = default_config(batch, rows, cols, bits)
    unknown = set(config) - set(cfg)
    if unknown:
        raise ValueError(f"unknown quantized_linear option(s) {sorted(unknown)} (known: lookup, {', '.join(cfg)})")
    cfg.update(config)
    if batch > 1 and (cfg["block_r"] < 16 or cfg["block_c"] < 16):
        raise ValueError(f"batch {batch} uses tl.dot: block_r and block_c must be >= 16 (got {cfg})")
    x = x if x.stride(1) == 1 else x.contiguous()
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    codebooks = codebooks.contiguous()
    split = cfg["split_k"]
    if split > 1 or cols == 0:  # slices add into fp32 zeros; no columns: y = bias
        y = torch.zeros(batch, rows, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    groups, g_num, g_den = group_args(rows, codebooks.shape[0], groups, group_size, packed.device)
    grid = (triton.cdiv(rows, cfg["block_r"]), split)
    # unused pointer arguments get `packed` or `x` (never read: HAS_GID / HAS_ORDER / HAS_BIAS are off)
    args = (x, packed, codebooks, groups if groups is not None else packed,
            row_order if row_order is not None else packed, bias if bias is not None else x, y,
            batch, rows, cols, x.stride(0), packed.stride(0), y.stride(0), g_num, g_den)
    meta = {**plane_args(bits, cols), "K": 1 << bits, "HAS_GID": groups is not None,
            "HAS_ORDER": row_order is not None, "HAS_BIAS": bias is not None, "LOOKUP": mode,
            "BLOCK_R": cfg["block_r"], "BLOCK_C": cfg["block_c"], "BLOCK_B": 1 if batch == 1 else 16,
            "SPLIT_K": split, "STAGES": cfg["stages"], "DOT": _dot_mode(x.dtype), "num_warps": cfg["num_warps"]}
    return grid, args, meta, y
