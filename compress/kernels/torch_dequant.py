"""The CPU path of `dequantize`: table-driven torch decoding, several times faster than the reference.

Instead of unpacking every index and then looking it up, it precomputes per group the values a whole packed
byte decodes to (one plane: [G, 256, 8/bits]; 3 bits: a 2-bit byte + the matching 1-bit nibble, [G, 4096, 4])
and gathers those rows by byte, so the work is one gather per byte. Falls back to the reference when the
tables would be large (many groups). Same results as `reference.dequantize_ref`, bit for bit (tested).
"""
from __future__ import annotations

import torch

from compress.kernels.reference import bit_planes, check_quantized, dequantize_ref, row_groups_of

__all__ = ["dequantize_torch"]

_MAX_TABLE = 1 << 22  # entries of a decode table (8 MiB in fp16) before the reference's gather is used


def dequantize_torch(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                     groups: torch.Tensor | None = None, group_size: int | None = None,
                     row_order: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense matrix W [rows, cols] in `dtype` (arguments: see `compress.kernels.reference`)."""
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    num_groups = codebooks.shape[0]
    planes = bit_planes(bits)
    if len(planes) > 1 and planes != [2, 1]:
        per_byte = 0  # 5-7 bits: the reference
    else:
        per_byte = 8 // bits if len(planes) == 1 else 4
    table_rows = 256 if len(planes) == 1 else 4096
    if per_byte == 0 or num_groups * table_rows * per_byte > _MAX_TABLE or rows == 0 or cols == 0:
        return dequantize_ref(packed, codebooks, bits, cols, groups=groups, group_size=group_size,
                              row_order=row_order, dtype=dtype)
    device = packed.device
    values = codebooks.float().to(dtype)  # rounded once, as the reference and the kernels do
    if len(planes) == 1:
        # code of slot s of byte b: (b >> s*bits) & mask
        codes = (torch.arange(256, device=device)[:, None] >> (torch.arange(per_byte, device=device) * bits)) \
            & ((1 << bits) - 1)
        keys = packed.int()  # [rows, ceil(cols / per)]
    else:
        # 3 bits: column quad q = 2-bit byte q (its 4 low-bit pairs) + nibble q of the 1-bit plane (high bits)
        n2 = -(-cols // 4)
        low, high = packed[:, :n2].int(), packed[:, n2:]
        nibbles = torch.stack([high & 15, high >> 4], dim=-1).reshape(rows, -1)[:, :n2]
        keys = (low << 4) | nibbles  # [rows, n2] in 0..4095
        k = torch.arange(4096, device=device)
        s = torch.arange(4, device=device)
        codes = (((k[:, None] >> 4) >> (2 * s)) & 3) | (((k[:, None] & 15) >> s) & 1) << 2
    table = values[:, codes].reshape(num_groups * table_rows, per_byte)  # [G * table_rows, per]
    # gather a row of the table as one wide integer when it is 2, 4 or 8 bytes (several times faster)
    width = per_byte * table.element_size()
    wide = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(width)
    if wide is not None:
        table = table.view(wide)
    g = row_groups_of(rows, num_groups, groups, group_size, device).int()  # int32 indices: half the traffic
    flat = (keys + (g * table_rows)[:, None]).reshape(-1)
    w = torch.index_select(table, 0, flat)
    if wide is not None:
        w = w.view(dtype)
    w = w.reshape(rows, -1)[:, :cols]
    if row_order is None:
        return w.contiguous()
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    out[row_order.long()] = w
    return out
