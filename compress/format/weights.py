"""Stored forms of a quantized weight: a JSON layout plus named tensors, their exact size, and decoding.

A weight of shape [R, ...] is viewed as a matrix [R, C] (C = product of the other dims; a conv weight
[c_out, c_in/g, kh, kw] is c_out rows of c_in/g*kh*kw). Two formats:

`codebook` (jlcm, kmeans, rtn): w[r, j] = base_r[idx[r, j]] * scale[g(r)] + offset[g(r)], where g(r) is
the row's group (G groups) and base_r is
  - "per-group": the row's group codebook, codebook[g(r)] (codebook: fp16 [G, 2^b]);
  - "shared":    one codebook for all rows, codebook[0] (codebook: fp16 [1, 2^b]);
  - "grid":      the integers 0 .. 2^b-1 (nothing stored; with scale and offset this is uniform int-b).
The row -> group map is stored as
  - "none":      not stored: G == 1 (every row in group 0) or G == R (row r in group r);
  - "group-ids": g(r) packed at ceil(log2 G) bits per row (`group_ids`: uint8 [1, ...], see packing);
  - "order":     the row permutation that sorts rows by the grouping statistic (`order`: int16 when
                 R <= 32767, else int32); position p of the sorted order is in group floor(p * G / R).
Tensors: packed (see below), codebook, scale (fp16 [G]), offset (fp16 [G]), group_ids or order, each only
when the layout uses it.

Indices are packed (packing.py) along the input dim, one row per output row (`packing: "rows"`, uint8
[R, packed_cols(C, b)]) when rows fill whole bytes in every bit plane; otherwise, e.g. the 9 weights of a
depthwise 3x3 row at 3 bits (5 bytes for 27 bits), the flattened [1, R*C] matrix is packed as one row
(`packing: "flat"`, uint8 [1, packed_cols(R*C, b)]), so short rows waste no padding.

`nf4` (bitsandbytes NF4): 4-bit indices into the fixed NF4 table, one absmax per block of `blocksize`
consecutive weights of the flattened tensor. Tensors: packed (as above, at 4 bits), absmax (fp32
[nblocks]); with double quantization absmax is uint8 codes of bitsandbytes' 8-bit dynamic map, plus
absmax_scale (fp32 [ceil(nblocks / 256)]) and absmax_offset (fp32 [1]).

Size is what these tensors take (padding included), so `storage_bits(layout)` is exact. It equals the
METHODS.md formula `b + (G * 2^b * 16 + scales + offsets + stored order) / n_weights` bits per weight up to
the padding of the last byte of each packed row.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from compress.format.coding import stored_index_bits
from compress.format.packing import bit_planes, pack_indices, packed_cols, unpack_indices

__all__ = ["CODEBOOKS", "ROW_MAPS", "buffer_specs", "empty_buffers", "storage_bits", "stored_bits", "bits_per_weight",
           "formula_bits", "row_groups", "decode", "encode_codebook", "encode_nf4", "matrix_shape", "id_bits"]

CODEBOOKS = ("per-group", "shared", "grid")
ROW_MAPS = ("none", "group-ids", "order")
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
DOUBLE_QUANT_BLOCK = 256  # bitsandbytes' block of the nested (8-bit) quantization of absmax
Stored = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (layout, tensors by name)


def matrix_shape(shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(R, C): rows = first dim, columns = the product of the others."""
    return int(shape[0]), int(math.prod(shape[1:]))


def id_bits(num_groups: int) -> int:
    """Bits of one stored group id."""
    return max(1, math.ceil(math.log2(num_groups)))


def row_packing(cols: int, bits: int) -> str:
    """"rows" when a row of `cols` indices fills whole bytes in every bit plane, else "flat"."""
    return "rows" if all(cols % (8 // width) == 0 for width in bit_planes(bits)) else "flat"


def _packed_shape(rows: int, cols: int, bits: int, packing: str) -> tuple[int, int]:
    return (rows, packed_cols(cols, bits)) if packing == "rows" else (1, packed_cols(rows * cols, bits))


def _pack(idx: torch.Tensor, bits: int, packing: str) -> torch.Tensor:
    return pack_indices(idx if packing == "rows" else idx.reshape(1, -1), bits)


def _unpack(packed: torch.Tensor, bits: int, rows: int, cols: int, packing: str) -> torch.Tensor:
    if packing == "rows":
        return unpack_indices(packed, bits, cols)
    return unpack_indices(packed, bits, rows * cols).reshape(rows, cols)


def _order_dtype(rows: int) -> torch.dtype:
    return torch.int16 if rows <= 32767 else torch.int32


def buffer_specs(layout: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the layout stores."""
    rows, cols = matrix_shape(layout["shape"])
    if layout["format"] == "nf4":
        nblocks = -(-rows * cols // layout["blocksize"])
        specs = {"packed": (_packed_shape(rows, cols, 4, layout["packing"]), torch.uint8)}
        if layout["double_quant"]:
            specs["absmax"] = ((nblocks,), torch.uint8)
            specs["absmax_scale"] = ((-(-nblocks // DOUBLE_QUANT_BLOCK),), torch.float32)
            specs["absmax_offset"] = ((1,), torch.float32)
        else:
            specs["absmax"] = ((nblocks,), torch.float32)
        return specs
    if layout["format"] != "codebook":
        raise ValueError(f"unknown quantized format '{layout['format']}' (known: codebook, nf4)")
    bits, groups = layout["bits"], layout["groups"]
    specs = {"packed": (_packed_shape(rows, cols, bits, layout["packing"]), torch.uint8)}
    if layout["codebook"] == "per-group":
        specs["codebook"] = ((groups, 1 << bits), torch.float16)
    elif layout["codebook"] == "shared":
        specs["codebook"] = ((1, 1 << bits), torch.float16)
    if layout["scale"]:
        specs["scale"] = ((groups,), torch.float16)
    if layout["offset"]:
        specs["offset"] = ((groups,), torch.float16)
    if layout["row_map"] == "group-ids":
        specs["group_ids"] = ((1, packed_cols(rows, id_bits(groups))), torch.uint8)
    elif layout["row_map"] == "order":
        specs["order"] = ((rows,), _order_dtype(rows))
    elif groups not in (1, rows):
        raise ValueError(f"row_map 'none' needs 1 or {rows} groups (got {groups})")
    if layout.get("column_scale", False):  # absent in artifacts written before it existed
        specs["column_scale"] = ((cols,), torch.float16)
    return specs


def empty_buffers(layout: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zero tensors of the layout's shapes (what a checkpoint restorer loads into)."""
    return {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in buffer_specs(layout).items()}


def storage_bits(layout: dict[str, Any]) -> int:
    """Exact bits the stored tensors of a quantized weight take (bias and other parameters excluded)."""
    return sum(math.prod(shape) * torch.tensor([], dtype=dtype).element_size() * 8
               for shape, dtype in buffer_specs(layout).values())


def stored_bits(layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> int:
    """Bits these tensors take in an artifact: storage_bits with the packed indices at their entropy-coded size
    (the container rANS-codes them when that is smaller; compress.format.coding.stored_index_bits)."""
    fixed = storage_bits(layout)
    packed = buffers.get("packed")
    if packed is None or not packed.numel():
        return fixed
    bits = 4 if layout["format"] == "nf4" else layout["bits"]
    rows, cols = matrix_shape(layout["shape"])
    symbols = _unpack(packed, bits, rows, cols, layout["packing"])
    raw_bytes = packed.numel()
    return fixed - 8 * raw_bytes + stored_index_bits(symbols, bits, raw_bytes)


def bits_per_weight(layout: dict[str, Any]) -> float:
    """Stored bits / weights, everything included (indices, codebooks, scales, offsets, row map)."""
    return storage_bits(layout) / math.prod(layout["shape"])


def formula_bits(bits: int, n_weights: int, codebooks: int, scales: int = 0, offsets: int = 0,
                 map_bits: int = 0) -> float:
    """METHODS.md: b + (codebooks * 2^b * 16 + 16 * scales + 16 * offsets + stored order bits) / n_weights."""
    return bits + (codebooks * (1 << bits) * 16 + 16 * scales + 16 * offsets + map_bits) / n_weights


def row_groups(layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """Group of every row, int64 [R]."""
    rows, _ = matrix_shape(layout["shape"])
    groups = layout["groups"]
    device = buffers["packed"].device
    if layout["row_map"] == "group-ids":
        return unpack_indices(buffers["group_ids"], id_bits(groups), rows)[0].long()
    if layout["row_map"] == "order":
        position_group = torch.div(torch.arange(rows, device=device) * groups, rows, rounding_mode="floor")
        out = torch.empty(rows, dtype=torch.long, device=device)
        out[buffers["order"].long()] = position_group
        return out
    if groups == rows and rows > 1:
        return torch.arange(rows, device=device)
    return torch.zeros(rows, dtype=torch.long, device=device)


@lru_cache(maxsize=None)
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(True, 7, 8)), so decoding needs no bitsandbytes."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return tuple(sorted(data))


def decode(layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense float32 weight [shape] the stored tensors stand for."""
    rows, cols = matrix_shape(layout["shape"])
    packed = buffers["packed"]
    if layout["format"] == "nf4":
        idx = _unpack(packed, 4, rows, cols, layout["packing"]).long().reshape(-1)
        absmax = buffers["absmax"]
        if layout["double_quant"]:
            code = torch.tensor(dynamic_map(), device=packed.device)
            block = torch.arange(absmax.numel(), device=packed.device) // DOUBLE_QUANT_BLOCK
            absmax = code[absmax.long()] * buffers["absmax_scale"].float()[block] + buffers["absmax_offset"].float()
        table = torch.tensor(NF4_TABLE, device=packed.device)
        scale = absmax.float().repeat_interleave(layout["blocksize"])[: rows * cols]
        return (table[idx] * scale).reshape(layout["shape"])
    bits = layout["bits"]
    idx = _unpack(packed, bits, rows, cols, layout["packing"]).long()
    g = row_groups(layout, buffers)
    if layout["codebook"] == "grid":
        w = idx.float()
    else:
        table = buffers["codebook"].float()
        base = table[g] if layout["codebook"] == "per-group" else table[0].expand(rows, -1)
        w = torch.gather(base, 1, idx)
    if layout["scale"]:
        w = w * buffers["scale"].float()[g][:, None]
    if layout["offset"]:
        w = w + buffers["offset"].float()[g][:, None]
    if layout.get("column_scale", False):
        w = w * buffers["column_scale"].float()[None, :]
    return w.reshape(layout["shape"])


def encode_codebook(shape: list[int] | tuple[int, ...], bits: int, indices: torch.Tensor, groups: torch.Tensor,
                    num_groups: int, codebook: torch.Tensor | None = None, kind: str = "per-group",
                    scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                    row_map: str = "group-ids", order: torch.Tensor | None = None,
                    column_scale: torch.Tensor | None = None) -> Stored:
    """Layout and tensors of a codebook-quantized weight.

    indices: integer [R, C] < 2^bits; groups: int [R] in [0, num_groups); codebook: [G, 2^b] ("per-group")
    or [2^b] / [1, 2^b] ("shared") or None ("grid"); scale, offset: [G] or None; order: the row permutation
    (needed for row_map "order"; rows must then be grouped by their position in it); column_scale: [C] or None,
    a factor on every column of the decoded matrix (activation-aware scales, see compress.quant.jlcm).
    """
    rows, cols = matrix_shape(shape)
    if kind not in CODEBOOKS:
        raise ValueError(f"unknown codebook kind '{kind}' (known: {', '.join(CODEBOOKS)})")
    if row_map == "none" and num_groups not in (1, rows):
        row_map = "group-ids"
    packing = row_packing(cols, bits)
    layout = {"format": "codebook", "shape": [int(s) for s in shape], "bits": int(bits), "groups": int(num_groups),
              "codebook": kind, "scale": scale is not None, "offset": offset is not None, "row_map": row_map,
              "packing": packing}
    if column_scale is not None:
        layout["column_scale"] = True
    buffers = {"packed": _pack(indices.reshape(rows, cols).to(torch.uint8), bits, packing)}
    if kind != "grid":
        cb = codebook.detach().reshape(-1 if kind == "per-group" else 1, 1 << bits)
        buffers["codebook"] = cb.to(torch.float16).contiguous()
    if scale is not None:
        buffers["scale"] = scale.detach().reshape(num_groups).to(torch.float16)
    if offset is not None:
        buffers["offset"] = offset.detach().reshape(num_groups).to(torch.float16)
    if row_map == "group-ids":
        buffers["group_ids"] = pack_indices(groups.reshape(1, rows), id_bits(num_groups))
    elif row_map == "order":
        if order is None:
            raise ValueError("row_map 'order' needs the row order")
        buffers["order"] = order.to(_order_dtype(rows))
    if column_scale is not None:
        buffers["column_scale"] = column_scale.detach().reshape(cols).to(torch.float16).contiguous()
    specs = buffer_specs(layout)
    for name, tensor in buffers.items():
        if tuple(tensor.shape) != specs[name][0]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the layout's {specs[name][0]}")
    return layout, buffers


def encode_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> Stored:
    """NF4 through bitsandbytes (`quantize_4bit`, on CPU whatever the weight's device), in our packing."""
    import bitsandbytes.functional as bnbf

    rows, cols = matrix_shape(weight.shape)
    packed_bnb, state = bnbf.quantize_4bit(weight.detach().float().cpu().contiguous(), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type="nf4")
    flat = packed_bnb.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: rows * cols]  # high nibble first
    packing = row_packing(cols, 4)
    layout = {"format": "nf4", "shape": [int(s) for s in weight.shape], "blocksize": int(blocksize),
              "double_quant": bool(double_quant), "packing": packing}
    buffers = {"packed": _pack(idx.reshape(rows, cols), 4, packing)}
    if double_quant:
        buffers["absmax"] = state.absmax.to(torch.uint8)
        buffers["absmax_scale"] = state.state2.absmax.float().reshape(-1)
        buffers["absmax_offset"] = torch.as_tensor(state.offset, dtype=torch.float32).reshape(1)
    else:
        buffers["absmax"] = state.absmax.float().reshape(-1)
    return layout, {name: t.to(weight.device) for name, t in buffers.items()}
