"""Bit packing of codebook indices into uint8 bytes (pure torch; the reference for later kernels).

Layout of `pack_indices(idx [rows, cols], bits)`:
- bits in {1, 2, 4, 8}: `8 // bits` indices per byte along the last dim; the index of column `j` sits in
  byte `j // (8 // bits)` at bit offset `(j % (8 // bits)) * bits` (first column in the lowest bits). The
  columns are zero-padded to a multiple of `8 // bits`, so a row takes `ceil(cols * bits / 8)` bytes.
- other widths (3, 5, 6, 7) are split into bit planes of 4, 2 and 1 bits (binary decomposition), lowest
  bits first: 3 bits = the low 2-bit plane, then the high 1-bit plane; 5 = 4 + 1; 6 = 4 + 2; 7 = 4 + 2 + 1.
  Each plane is packed as above and the planes are concatenated along the last dim, so a 3-bit row of
  `cols` indices takes `ceil(cols / 4) + ceil(cols / 8)` bytes.
"""
from __future__ import annotations

import torch

__all__ = ["pack_indices", "unpack_indices", "packed_cols", "bit_planes"]


def bit_planes(bits: int) -> list[int]:
    """Widths of the planes a `bits`-wide index is stored in, lowest bits first (3 -> [2, 1])."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (got {bits})")
    if bits in (1, 2, 4, 8):
        return [bits]
    # lowest bits first: 3 = 2 (bits 0-1) + 1 (bit 2); 7 = 4 (bits 0-3) + 2 + 1
    out, rest = [], bits
    for width in (4, 2, 1):
        if rest >= width:
            out.append(width)
            rest -= width
    return out


def _plane_cols(cols: int, width: int) -> int:
    per = 8 // width
    return -(-cols // per)


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row of `cols` indices packed at `bits`."""
    return sum(_plane_cols(cols, w) for w in bit_planes(bits))


def _pack_plane(values: torch.Tensor, width: int) -> torch.Tensor:
    """values: uint8 [rows, cols] < 2**width -> uint8 [rows, ceil(cols / (8 // width))]."""
    per = 8 // width
    rows, cols = values.shape
    pad = (-cols) % per
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.reshape(rows, -1, per).to(torch.int32)
    shifts = torch.arange(per, device=values.device, dtype=torch.int32) * width
    return (values << shifts).sum(-1).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, width: int, cols: int) -> torch.Tensor:
    per = 8 // width
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * width
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return values.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack indices `idx` (integer [rows, cols], values < 2**bits) into uint8 [rows, packed_cols(cols, bits)]."""
    if idx.dim() != 2:
        raise ValueError(f"pack_indices expects a 2-D [rows, cols] tensor (got shape {tuple(idx.shape)})")
    planes = bit_planes(bits)
    if idx.numel() and int(idx.max()) >= (1 << bits):
        raise ValueError(f"index {int(idx.max())} does not fit in {bits} bits")
    idx = idx.to(torch.uint8) if bits <= 8 else idx
    if planes == [8]:
        return idx.contiguous().clone()
    parts, shift = [], 0
    for width in planes:
        parts.append(_pack_plane((idx >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def unpack_indices(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_indices`: uint8 [rows, packed_cols] -> uint8 [rows, cols]."""
    planes = bit_planes(bits)
    if packed.shape[-1] != packed_cols(cols, bits):
        raise ValueError(f"packed rows hold {packed.shape[-1]} bytes; {cols} indices at {bits} bits need "
                         f"{packed_cols(cols, bits)}")
    if planes == [8]:
        return packed.to(torch.uint8)
    out = torch.zeros(packed.shape[0], cols, dtype=torch.uint8, device=packed.device)
    start, shift = 0, 0
    for width in planes:
        n = _plane_cols(cols, width)
        out |= _unpack_plane(packed[:, start:start + n], width, cols) << shift
        start += n
        shift += width
    return out
