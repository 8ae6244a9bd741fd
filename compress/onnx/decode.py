"""A traceable twin of `compress.format.weights.decode`: what the ONNX graph computes from the stored tensors.

`decode` in formats.py is written for eager PyTorch; this version computes exactly the same float32 weight
(the tests check bit equality) but only with operations that the TorchScript ONNX exporter turns into a
few integer/float nodes and without any constant that grows with the weight:

- unpacking a bit plane of width w: the uint8 bytes [r, n] are unsqueezed to [r, n, 1], shifted right by
  the 8/w constants (0, w, 2w, ...) and masked with 2^w - 1, then flattened to [r, n * 8/w] and cut to the
  columns (opset >= 18: BitShift + BitwiseAnd on uint8; older opsets: the same with integer Div and Mod on
  int32); a 3/5/6/7-bit index is split into its planes, which are cast to int64, multiplied by 2^shift and
  added; 8-bit indices are one 8-bit plane;
- the row -> group map: packed group ids (layers of PACKED_GROUP_IDS_MIN_ROWS rows or more) are unpacked
  the same way; otherwise the map, and always a row order ("order"), is stored as the group of every row,
  one byte per row (see `graph_tensors`); the map gathers the row's codebook, scale and offset;
- codebook values come from Gather / GatherElements into the fp16 codebooks (cast to float32), then the
  per-group scale and offset; NF4 uses its 16-entry table and per-block absmax (8-bit dynamic map and
  nested scales when double-quantized).

Every form traces to the same nodes whatever its sizes (the cut is traced even when it keeps every column,
"rows" and "flat" packing both end in a Reshape to the weight's shape): the export writes one decode
function per form and passes the sizes as attributes of each layer's call (`compress.onnx.export`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.format.weights import DOUBLE_QUANT_BLOCK, NF4_TABLE, dynamic_map, id_bits, matrix_shape
from compress.format.packing import bit_planes

__all__ = ["BITOPS_MIN_OPSET", "decode_traceable", "graph_tensors", "unpack_traceable"]

BITOPS_MIN_OPSET = 18  # BitwiseAnd / BitwiseOr appear in opset 18; BitShift (uint8) in opset 11


def _unpack_plane(packed: torch.Tensor, rows: int, nbytes: int, width: int, cols: int, bitops: bool) -> torch.Tensor:
    """uint8 [rows, nbytes] -> [rows, cols] (uint8 with bit ops, int32 without) of the `width`-bit values.

    Every size is a Python int from the layout (never `tensor.shape`), so the traced graph holds constant
    shapes instead of Shape/Gather/Unsqueeze/Concat chains. The cut to `cols` is traced even where it
    keeps every column, so that a plane of any width and size is the same chain of nodes with other
    constants (one decode function serves them all, see `compress.onnx.export._functionize`).
    """
    per = 8 // width
    mask = (1 << width) - 1
    if bitops:
        shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
        values = (packed.unsqueeze(-1) >> shifts) & mask
    else:
        divisors = torch.tensor([1 << (k * width) for k in range(per)], dtype=torch.int32, device=packed.device)
        values = torch.fmod(torch.div(packed.to(torch.int32).unsqueeze(-1), divisors, rounding_mode="trunc"),
                            mask + 1)
    # flatten(1) rather than reshape(rows, nbytes * per): an ONNX Flatten, whose only constant is its axis
    return values.flatten(1).narrow(1, 0, cols)


def unpack_traceable(packed: torch.Tensor, bits: int, rows: int, cols: int, bitops: bool) -> torch.Tensor:
    """Inverse of `compress.format.packing.pack_indices`: uint8 [rows, packed_cols] -> int64 [rows, cols].

    8-bit indices are unpacked as one 8-bit plane (shift 0, mask 255) rather than just cast, for the same
    reason as the cut in `_unpack_plane`.
    """
    planes = bit_planes(bits)
    sizes = [-(-cols // (8 // width)) for width in planes]
    # one Split (one constant: the sizes) rather than a Slice per plane (two constants each)
    parts = [packed] if len(planes) == 1 else torch.split(packed, sizes, dim=1)
    out: torch.Tensor | None = None
    shift = 0
    for width, nbytes, part in zip(planes, sizes, parts):
        part = _unpack_plane(part, rows, nbytes, width, cols, bitops).to(torch.int64)
        # the planes hold disjoint bits, so adding the shifted plane is or-ing it in (the TorchScript
        # exporter has no BitwiseOr for integers, and onnxruntime adds no uint8)
        out = part if out is None else out + part * (1 << shift)
        shift += width
    assert out is not None
    return out


def _unpack_matrix(packed: torch.Tensor, bits: int, shape: list[int], packing: str, bitops: bool) -> torch.Tensor:
    """[rows, cols] int64 indices of a weight of `shape`. "rows" and "flat" packing trace to the same nodes
    (with other constants), and the shape they are brought to is the weight's: the same constant as the
    decoder's last Reshape."""
    rows, cols = matrix_shape(shape)
    if packing == "rows":
        idx = unpack_traceable(packed, bits, rows, cols, bitops)
    else:
        idx = unpack_traceable(packed, bits, 1, rows * cols, bitops)
    return idx.reshape(shape).flatten(1)


def _group_dtype(groups: int) -> torch.dtype:
    return torch.uint8 if groups <= 256 else torch.int16 if groups <= 32767 else torch.int32


# group ids stay packed (and are unpacked by the graph) for layers of at least this many rows; smaller
# layers store the group of every row, one byte per row. Measured on the demo detector (51 group-id layers
# of 10..90 rows): packed ids everywhere made the file 1.0 kB bigger (each call then carries the ids'
# split and cut sizes, ~20 bytes, and the decode functions grow) and onnxruntime's session creation
# ~0.1 s slower (1.6x the nodes to fold); a layer of R rows and b-bit ids saves R * (8 - b) / 8 bytes.
PACKED_GROUP_IDS_MIN_ROWS = 256


def graph_tensors(layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the graph stores for a layer: its stored tensors, except that a row -> group map becomes
    `row_group`, the group of every row (uint8 [R] for <= 256 groups), for a row order (row_map "order":
    no bigger than the int16 order, and no scatter in the graph) and for group ids of a layer with fewer
    than PACKED_GROUP_IDS_MIN_ROWS rows (bigger layers keep them packed; the graph unpacks them like the
    indices).
    """
    if layout.get("format") != "codebook" or layout.get("row_map") not in ("group-ids", "order"):
        return dict(buffers)
    if layout["row_map"] == "group-ids" and matrix_shape(layout["shape"])[0] >= PACKED_GROUP_IDS_MIN_ROWS:
        return dict(buffers)
    from compress.format.weights import row_groups

    out = {k: v for k, v in buffers.items() if k not in ("group_ids", "order")}
    out["row_group"] = row_groups(layout, buffers).to(_group_dtype(layout["groups"]))
    return out


def _per_group(values: torch.Tensor, g: torch.Tensor | None, groups: int) -> torch.Tensor:
    """[G] per-group values -> a [R, 1] (or [1, 1]) column to broadcast over the rows."""
    values = values.to(torch.float32)
    if g is not None:
        values = values[g]
    elif groups == 1:
        values = values[:1]
    return values.unsqueeze(1)


def _decode_nf4(layout: dict[str, Any], buffers: dict[str, torch.Tensor], rows: int, cols: int,
                bitops: bool) -> torch.Tensor:
    packed = buffers["packed"]
    idx = _unpack_matrix(packed, 4, layout["shape"], layout["packing"], bitops).reshape(-1)
    absmax = buffers["absmax"]
    blocksize = layout["blocksize"]
    nblocks = -(-rows * cols // blocksize)
    if layout["double_quant"]:
        code = torch.tensor(dynamic_map(), dtype=torch.float32, device=packed.device)
        nested = buffers["absmax_scale"].to(torch.float32)
        # absmax_scale[block // 256] for every block, without an index constant of nblocks int64s
        nested = nested.unsqueeze(1).expand(-(-nblocks // DOUBLE_QUANT_BLOCK), DOUBLE_QUANT_BLOCK).reshape(-1)[:nblocks]
        absmax = code[absmax.to(torch.int64)] * nested + buffers["absmax_offset"].to(torch.float32)
    table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=packed.device)
    w = table[idx]
    pad = nblocks * blocksize - rows * cols
    if pad:
        w = F.pad(w, (0, pad))
    w = (w.reshape(nblocks, blocksize) * absmax.to(torch.float32).unsqueeze(1)).reshape(-1)
    if pad:
        w = w[: rows * cols]
    return w.reshape(layout["shape"])


def decode_traceable(layout: dict[str, Any], buffers: dict[str, torch.Tensor], bitops: bool = True) -> torch.Tensor:
    """The dense float32 weight [shape] (equal to `formats.decode`) from `graph_tensors(layout, stored)`,
    built from traceable ops only."""
    rows, cols = matrix_shape(layout["shape"])
    if layout["format"] == "nf4":
        return _decode_nf4(layout, buffers, rows, cols, bitops)
    if layout["format"] != "codebook":
        raise ValueError(f"unknown quantized format {layout['format']!r}")
    bits, groups, kind = layout["bits"], layout["groups"], layout["codebook"]
    idx = _unpack_matrix(buffers["packed"], bits, layout["shape"], layout["packing"], bitops)
    # group of every row (int64 [R]); None when row r is in group r or when there is a single group
    if layout["row_map"] in ("group-ids", "order") and not {"row_group", "group_ids"} & set(buffers):
        raise ValueError(f"row_map {layout['row_map']!r} needs 'row_group': pass graph_tensors(layout, stored)")
    if "row_group" in buffers:
        g = buffers["row_group"].to(torch.int64)
    elif layout["row_map"] == "group-ids":
        g = unpack_traceable(buffers["group_ids"], id_bits(groups), 1, rows, bitops).reshape(-1)
    else:
        g = None
    if kind == "grid":
        w = idx.to(torch.float32)
    elif kind == "shared":
        w = buffers["codebook"].to(torch.float32)[0][idx]
    elif kind == "per-group":
        table = buffers["codebook"].to(torch.float32)
        if g is not None:
            table = table[g]
        elif groups == 1:
            table = table.expand(rows, 1 << bits)
        w = torch.gather(table, 1, idx)
    else:
        raise ValueError(f"unknown codebook kind {kind!r}")
    if layout["scale"]:
        w = w * _per_group(buffers["scale"], g, groups)
    if layout["offset"]:
        w = w + _per_group(buffers["offset"], g, groups)
    if layout.get("column_scale", False):
        w = w * buffers["column_scale"].to(torch.float32)[None, :]
    return w.reshape(layout["shape"])
