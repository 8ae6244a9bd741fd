"""Triton pieces shared by the dequantize and the fused linear kernels: unpack, codebook lookup, launch args.

Importing this module imports triton: only `compress.kernels.dispatch` does, lazily, on the Triton path.
Set TRITON_INTERPRET=1 before the first import to run the kernels on CPU tensors (the variable is read when
a kernel is decorated).

Lookup strategies (the constexpr LOOKUP), all exact, chosen per bit width by `lookup_mode`:
- SELECT (default up to 3 bits): the <= 8 entries of each row's codebook are loaded once per program into
  registers, one value per row ([BLOCK_R, 1] each), and an element picks its entry with a tree of `where` on
  its index bits (K - 1 selects; sm_90 SASS: ~7 instructions an element at 2 bits, ~12 at 3 bits, the
  multiply-add included);
- GLOBAL (default from 4 bits): a gather load from the codebook table in global memory (G * 2^b values:
  a few KiB, L1-resident; ~12 instructions an element at 4 bits);
- GATHER (opt-in, 3 bits and up): the program's codebook rows [BLOCK_R, K] in registers and `tl.gather`
  along K (warp shuffles; ~8 instructions an element at 4 bits in the fused linear), but triton 3.8 fails to
  compile some tile shapes (an assertion in OptimizeThreadLocality; always for K = 4), so it is not a default.
Instruction counts come from `compress.kernels.compile_check` (no GPU measured them yet).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from compress.kernels.reference import bit_planes, packed_cols, row_groups_of


@triton.jit
def _probe():
    pass


# whether triton.jit makes interpreted functions here (TRITON_INTERPRET=1 at import): they run on CPU tensors
INTERPRET = not isinstance(_probe, JITFunction)
# the interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest even (triton 3.8), so under it
# `cast_to` rounds with integer ops; compiled kernels use the hardware's round-to-nearest-even conversion
EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)

SELECT, GLOBAL, GATHER = 0, 1, 2
LOOKUPS = {"select": SELECT, "global": GLOBAL, "gather": GATHER}
# the same values as kernel-visible globals (a @jit function reads only constexpr globals)
LOOKUP_SELECT = tl.constexpr(SELECT)
LOOKUP_GLOBAL = tl.constexpr(GLOBAL)


def lookup_mode(bits: int, lookup: str | None) -> int:
    """The LOOKUP constexpr: `lookup` by name, or SELECT up to 3 bits and GLOBAL above when None."""
    if lookup is None:
        return SELECT if bits <= 3 else GLOBAL
    if lookup not in LOOKUPS:
        raise ValueError(f"unknown lookup '{lookup}' (known: {', '.join(LOOKUPS)})")
    if lookup == "select" and bits > 3:
        raise ValueError(f"lookup 'select' keeps at most 8 codebook entries in registers (bits <= 3; got {bits})")
    if lookup == "gather" and bits < 3:
        raise ValueError(f"lookup 'gather' needs bits >= 3 (triton fails to compile tl.gather over {1 << bits} "
                         "entries); use 'select'")
    return LOOKUPS[lookup]


def plane_args(bits: int, cols: int) -> dict[str, int]:
    """Widths (W0..W2, 0 = no plane), byte offsets (OFF1, OFF2) and bytes per row (NB0..NB2) of the planes."""
    widths = bit_planes(bits) + [0] * (3 - len(bit_planes(bits)))
    nbytes = [packed_cols(cols, w) if w else 0 for w in widths]
    return {"W0": widths[0], "W1": widths[1], "W2": widths[2], "off1": nbytes[0], "off2": nbytes[0] + nbytes[1],
            "nb0": nbytes[0], "nb1": nbytes[1], "nb2": nbytes[2]}


def group_args(rows: int, num_groups: int, groups: torch.Tensor | None, group_size: int | None,
               device: torch.device) -> tuple[torch.Tensor | None, int, int]:
    """(groups, g_num, g_den): the kernel reads group(r) from `groups` when given, else computes
    r * g_num // g_den in int32 (a group tensor is made instead when rows * G would not fit in int32)."""
    if groups is None and group_size is None and rows * num_groups >= 2 ** 31:
        groups = row_groups_of(rows, num_groups, device=device).to(torch.int32)
    if groups is not None:
        return groups, 1, 1
    if group_size is not None:
        return None, 1, group_size
    return None, num_groups, max(rows, 1)


@triton.jit
def _plane(row_ptr, rmask, c0, off, nbytes, BLOCK_C: tl.constexpr, WIDTH: tl.constexpr):
    """Indices of one bit plane for columns c0 .. c0 + BLOCK_C: int32 [BLOCK_R, BLOCK_C].

    row_ptr: [BLOCK_R, 1] pointers to the packed rows; the plane starts `off` bytes in and holds `nbytes`.
    The bytes are loaded once ([BLOCK_R, BLOCK_C / per], contiguous) and split with shifts; `interleave`
    (register-local) puts index s of byte b at column b * per + s, lowest bits first.
    """
    PER: tl.constexpr = 8 // WIDTH
    NB: tl.constexpr = BLOCK_C // PER
    b = c0 // PER + tl.arange(0, NB)
    v = tl.load(row_ptr + off + b[None, :], mask=rmask[:, None] & (b < nbytes)[None, :], other=0).to(tl.int32)
    if PER == 1:
        out = v
    elif PER == 2:
        out = tl.interleave(v & 15, v >> 4)
    elif PER == 4:
        out = tl.interleave(tl.interleave(v & 3, (v >> 4) & 3), tl.interleave((v >> 2) & 3, v >> 6))
    else:
        out = tl.interleave(
            tl.interleave(tl.interleave(v & 1, (v >> 4) & 1), tl.interleave((v >> 2) & 1, (v >> 6) & 1)),
            tl.interleave(tl.interleave((v >> 1) & 1, (v >> 5) & 1), tl.interleave((v >> 3) & 1, v >> 7)))
    return out


@triton.jit
def load_indices(row_ptr, rmask, c0, off1, off2, nb0, nb1, nb2, BLOCK_C: tl.constexpr,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """Codebook indices int32 [BLOCK_R, BLOCK_C] of columns c0 .. c0 + BLOCK_C (planes lowest bits first)."""
    idx = _plane(row_ptr, rmask, c0, 0, nb0, BLOCK_C, W0)
    if W1 > 0:
        idx = idx | (_plane(row_ptr, rmask, c0, off1, nb1, BLOCK_C, W1) << W0)
    if W2 > 0:
        idx = idx | (_plane(row_ptr, rmask, c0, off2, nb2, BLOCK_C, W2) << (W0 + W1))
    return idx


@triton.jit
def row_groups(gid_ptr, r, rmask, g_num, g_den, HAS_GID: tl.constexpr):
    """Group of rows r (int32 [BLOCK_R]); 0 for rows past the end so every codebook read stays in bounds."""
    if HAS_GID:
        g = tl.load(gid_ptr + r, mask=rmask, other=0).to(tl.int32)
    else:
        g = (r * g_num) // g_den
    return tl.where(rmask, g, 0)


@triton.jit
def codebook_registers(cb_ptr, g, K: tl.constexpr):
    """The K <= 8 codebook entries of each row, fp32 [BLOCK_R, 1] each (entries past K repeat entry 0)."""
    base = cb_ptr + g * K
    c0 = tl.load(base).to(tl.float32)[:, None]
    c1 = tl.load(base + 1).to(tl.float32)[:, None]
    if K >= 4:
        c2 = tl.load(base + 2).to(tl.float32)[:, None]
        c3 = tl.load(base + 3).to(tl.float32)[:, None]
    else:
        c2 = c0
        c3 = c0
    if K >= 8:
        c4 = tl.load(base + 4).to(tl.float32)[:, None]
        c5 = tl.load(base + 5).to(tl.float32)[:, None]
        c6 = tl.load(base + 6).to(tl.float32)[:, None]
        c7 = tl.load(base + 7).to(tl.float32)[:, None]
    else:
        c4 = c0
        c5 = c0
        c6 = c0
        c7 = c0
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def select(idx, c0, c1, c2, c3, c4, c5, c6, c7, K: tl.constexpr):
    """fp32 [BLOCK_R, BLOCK_C]: entry idx of each row's register codebook (K <= 8).

    A tree on the index bits: K - 1 selects and log2(K) bit tests an element (a compare chain costs 2K - 2).
    """
    b0 = (idx & 1) != 0
    w = tl.where(b0, c1, c0)
    if K >= 4:
        b1 = (idx & 2) != 0
        w = tl.where(b1, tl.where(b0, c3, c2), w)
        if K >= 8:
            w = tl.where((idx & 4) != 0, tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)), w)
    return w


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x (fp32) in `dtype`, rounded to nearest even (as torch's .to) also under the interpreter."""
    if EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        out = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out
