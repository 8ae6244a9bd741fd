"""Plain torch references of the kernels: decode a codebook-quantized matrix, and the quantized linear.

A quantized matrix W [rows, cols] (a conv weight [c_out, c_in/g, kh, kw] is c_out rows of c_in/g*kh*kw) is
- `packed`: uint8 [rows, packed_cols(cols, bits)], the codebook indices packed along the columns
  (layout: `compress.format.packing`; 3 bits = a 2-bit plane then a 1-bit plane);
- `codebooks`: float [G, 2**bits], one codebook per group of rows (fp16 as stored; fp32 when a scale or
  offset has been folded in, see `compress.kernels.codebook_kernel_args`);
- the group of each stored row, one of
  - `groups`: int [rows], the group of every stored row;
  - `group_size`: row r is in group r // group_size;
  - neither: the G groups split the rows evenly, row r is in group floor(r * G / rows) (G == 1: one shared
    codebook; G == rows: one per row; G divides rows: contiguous groups of rows / G);
- `row_order`: optional int [rows], a permutation: stored row r is output row row_order[r].

    W[row_order[r], j] = codebooks[group(r), idx[r, j]]

The Triton kernels (`triton_dequant`, `triton_gemv`) and the table-driven CPU path (`torch_dequant`) compute
exactly this; `compress.kernels.dispatch` picks between them.
"""
from __future__ import annotations

import torch

from compress.format.packing import bit_planes, packed_cols

__all__ = ["check_quantized", "row_groups_of", "unpack_ref", "dequantize_ref", "gemv_ref", "bit_planes",
           "packed_cols"]


def check_quantized(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int,
                    groups: torch.Tensor | None = None, group_size: int | None = None,
                    row_order: torch.Tensor | None = None) -> int:
    """Validate the tensors of a quantized matrix (cheap checks only: no data is read); returns rows."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8 (got {bits!r})")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be uint8 [rows, packed_cols] (got {packed.dtype} {tuple(packed.shape)})")
    rows = packed.shape[0]
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(f"packed rows hold {packed.shape[1]} bytes; {cols} indices at {bits} bits need "
                         f"{packed_cols(cols, bits)} (packing.packed_cols)")
    if codebooks.dim() != 2 or codebooks.shape[1] != 1 << bits or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be float [G, {1 << bits}] for {bits} bits "
                         f"(got {codebooks.dtype} {tuple(codebooks.shape)})")
    num_groups = codebooks.shape[0]
    if num_groups < 1:
        raise ValueError("codebooks must hold at least one group")
    if groups is not None and group_size is not None:
        raise ValueError("give either groups (a group per row) or group_size, not both")
    if groups is not None and (groups.shape != (rows,) or groups.is_floating_point()):
        raise ValueError(f"groups must be an int tensor [{rows}] (got {groups.dtype} {tuple(groups.shape)})")
    if group_size is not None and (group_size < 1 or -(-rows // group_size) > num_groups):
        raise ValueError(f"group_size {group_size} cuts {rows} rows into {-(-rows // group_size)} groups; "
                         f"the codebooks hold {num_groups}")
    if row_order is not None and (row_order.shape != (rows,) or row_order.is_floating_point()):
        raise ValueError(f"row_order must be an int tensor [{rows}] (got {row_order.dtype} {tuple(row_order.shape)})")
    for name, t in (("codebooks", codebooks), ("groups", groups), ("row_order", row_order)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"{name} is on {t.device}, packed on {packed.device}: put them on one device")
    return rows


def row_groups_of(rows: int, num_groups: int, groups: torch.Tensor | None = None, group_size: int | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The group of every stored row, int64 [rows] (see the module docstring for the three ways)."""
    if groups is not None:
        return groups.to(device=device, dtype=torch.long)
    r = torch.arange(rows, device=device)
    if group_size is not None:
        return torch.div(r, group_size, rounding_mode="floor")
    return torch.div(r * num_groups, max(rows, 1), rounding_mode="floor")


def unpack_ref(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codebook indices, int64 [rows, cols], of packed uint8 [rows, packed_cols(cols, bits)].

    Written per column as the kernels do it (byte j // per, shift (j % per) * width of each plane), so it
    checks `packing.unpack_indices` independently.
    """
    j = torch.arange(cols, device=packed.device)
    idx = torch.zeros(packed.shape[0], cols, dtype=torch.long, device=packed.device)
    start, shift = 0, 0
    for width in bit_planes(bits):
        per = 8 // width
        byte = packed[:, start + torch.div(j, per, rounding_mode="floor")].long()
        idx |= ((byte >> ((j % per) * width)) & ((1 << width) - 1)) << shift
        start += -(-cols // per)
        shift += width
    return idx


def dequantize_ref(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                   groups: torch.Tensor | None = None, group_size: int | None = None,
                   row_order: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense matrix W [rows, cols] in `dtype`: W[row_order[r], j] = codebooks[group(r), idx[r, j]]."""
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    idx = unpack_ref(packed, bits, cols)
    g = row_groups_of(rows, codebooks.shape[0], groups, group_size, packed.device)
    # values are read in fp32 and rounded once to `dtype`, as the kernels do
    w = torch.gather(codebooks.float()[g], 1, idx).to(dtype)
    if row_order is None:
        return w
    out = torch.empty_like(w)
    out[row_order.long()] = w
    return out


def gemv_ref(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
             groups: torch.Tensor | None = None, group_size: int | None = None,
             row_order: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., cols] @ W.T + bias -> [..., rows] in x's dtype, accumulated in fp32."""
    w = dequantize_ref(packed, codebooks, bits, cols, groups=groups, group_size=group_size,
                       row_order=row_order, dtype=torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
