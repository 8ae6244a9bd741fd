"""Triton dequantize: packed indices + per-group codebooks (+ row order) -> dense fp16/bf16/fp32 matrix.

One program per block of BLOCK_R rows (times SPLIT_C column slices) loads its rows' codebooks once, then per
tile of BLOCK_C columns loads the packed bytes once (contiguous), splits them with shifts and masks, looks
each index up in its row group's codebook (see `triton_common` for the lookup strategies) and writes the
tile to its output rows (row_order[r] when a row order is given). The column loop is software-pipelined
(STAGES loads in flight). Bandwidth-bound: it reads bits/8 bytes and writes 2 (fp16/bf16) bytes a weight.
Reference: `compress.kernels.reference.dequantize_ref`. Imported lazily (it imports triton).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from compress.kernels.reference import check_quantized
from compress.kernels.triton_common import (LOOKUP_GLOBAL, LOOKUP_SELECT, cast_to, codebook_registers, group_args,
                                            load_indices, lookup_mode, plane_args, row_groups, select)

__all__ = ["dequantize_triton", "dequantize_launch", "default_config"]

_TARGET_PROGRAMS = 528  # ~4 programs per SM of an H100 (132 SMs)


@triton.jit
def _dequant_kernel(p_ptr, cb_ptr, gid_ptr, order_ptr, out_ptr,
                    rows, cols, stride_p, stride_o, g_num, g_den,
                    off1, off2, nb0, nb1, nb2,
                    K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                    HAS_GID: tl.constexpr, HAS_ORDER: tl.constexpr, LOOKUP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_C: tl.constexpr, STAGES: tl.constexpr):
    # program (i, j): rows i*BLOCK_R .. +BLOCK_R, column tiles j, j + SPLIT_C, ...
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
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
    if HAS_ORDER:
        out_r = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
    else:
        out_r = r.to(tl.int64)
    out_rows = out_ptr + out_r[:, None] * stride_o
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in tl.range(pid_c * BLOCK_C, cols, BLOCK_C * SPLIT_C, num_stages=STAGES):
        idx = load_indices(row_ptr, rmask, c0, off1, off2, nb0, nb1, nb2, BLOCK_C, W0, W1, W2)
        if LOOKUP == LOOKUP_SELECT:
            w = select(idx, k0, k1, k2, k3, k4, k5, k6, k7, K)
        elif LOOKUP == LOOKUP_GLOBAL:
            w = tl.load(cb_rows + idx)
        else:
            w = tl.gather(table, idx, 1)
        c = c0 + offs_c
        tl.store(out_rows + c[None, :], cast_to(w.to(tl.float32), out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (c < cols)[None, :])


def default_config(rows: int, cols: int, bits: int) -> dict[str, int]:
    """Tile and launch defaults, chosen from sm_90 SASS (instructions an element, no spills) and the aim of
    ~4 programs an SM; not yet timed on a GPU (`tools/bench_kernels.py --sweep` does)."""
    block_c = min(512, max(8, triton.next_power_of_2(cols)))
    block_r = min(4, triton.next_power_of_2(max(rows, 1)))
    row_blocks = max(1, triton.cdiv(rows, block_r))
    split_c = max(1, min(triton.cdiv(cols, block_c), triton.cdiv(_TARGET_PROGRAMS, row_blocks)))
    return {"block_r": block_r, "block_c": block_c, "split_c": split_c, "stages": 3, "num_warps": 4}


def dequantize_triton(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                      groups: torch.Tensor | None = None, group_size: int | None = None,
                      row_order: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                      out: torch.Tensor | None = None, **config: Any) -> torch.Tensor:
    """Dense W [rows, cols] in `dtype` (written into `out` when given: a workspace reused across calls).

    config: lookup ("select" / "global" / "gather"), block_r, block_c (powers of two, block_c >= 8), split_c
    (programs per row block), stages, num_warps: override `default_config` (for benchmarks).
    """
    grid, args, meta, out = dequantize_launch(packed, codebooks, bits, cols, groups=groups, group_size=group_size,
                                              row_order=row_order, dtype=dtype, out=out, **config)
    if out.numel():
        _dequant_kernel[grid](*args, **meta)
    return out


def dequantize_launch(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                      groups: torch.Tensor | None = None, group_size: int | None = None,
                      row_order: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                      out: torch.Tensor | None = None, lookup: str | None = None,
                      **config: int) -> tuple[tuple[int, int], tuple, dict[str, Any], torch.Tensor]:
    """(grid, args, constexprs + launch options, out) of `_dequant_kernel` (also used to compile it ahead)."""
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32 (got {dtype})")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    elif out.shape != (rows, cols) or out.stride(1) != 1 or out.device != packed.device:
        raise ValueError(f"out must be [{rows}, {cols}] with unit column stride on {packed.device} "
                         f"(got {tuple(out.shape)}, strides {out.stride()}, {out.device})")
    mode = lookup_mode(bits, lookup)
    cfg = default_config(rows, cols, bits)
    unknown = set(config) - set(cfg)
    if unknown:
        raise ValueError(f"unknown dequantize option(s) {sorted(unknown)} (known: lookup, {', '.join(cfg)})")
    cfg.update(config)
    groups, g_num, g_den = group_args(rows, codebooks.shape[0], groups, group_size, packed.device)
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    codebooks = codebooks.contiguous()
    grid = (triton.cdiv(rows, cfg["block_r"]), cfg["split_c"])
    # unused pointer arguments get `packed` (never read: HAS_GID / HAS_ORDER are off)
    args = (packed, codebooks, groups if groups is not None else packed, row_order if row_order is not None else packed,
            out, rows, cols, packed.stride(0), out.stride(0), g_num, g_den)
    meta = {**plane_args(bits, cols), "K": 1 << bits, "HAS_GID": groups is not None,
            "HAS_ORDER": row_order is not None, "LOOKUP": mode, "BLOCK_R": cfg["block_r"],
            "BLOCK_C": cfg["block_c"], "SPLIT_C": cfg["split_c"], "STAGES": cfg["stages"],
            "num_warps": cfg["num_warps"]}
    return grid, args, meta, out
