"""Random quantized matrices for the kernel tests (tiny: the Triton interpreter costs ~0.5 ms a program)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from compress.format.packing import pack_indices

GROUP_MODES = ("shared", "even", "group_size", "per_row", "tensor")


def make_quantized(rows: int, cols: int, bits: int, group_mode: str = "even", num_groups: int = 3,
                   row_order: bool = False, seed: int = 0,
                   codebook_dtype: torch.dtype = torch.float16) -> tuple[dict[str, Any], torch.Tensor]:
    """(kwargs of dequantize / quantized_linear, the unpacked indices int64 [rows, cols]).

    group_mode: "shared" (G = 1), "even" (G groups split the rows evenly), "group_size" (row r in r // size),
    "per_row" (G = rows), "tensor" (a random group per row).
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    args: dict[str, Any] = {"packed": pack_indices(idx, bits), "bits": bits, "cols": cols}
    if group_mode == "shared":
        num_groups = 1
    elif group_mode == "per_row":
        num_groups = rows
    elif group_mode == "group_size":
        size = max(1, -(-rows // num_groups))
        args["group_size"] = size
        num_groups = -(-rows // size)
    elif group_mode == "tensor":
        args["groups"] = torch.randint(0, num_groups, (rows,), generator=gen, dtype=torch.int32)
    elif group_mode != "even":
        raise ValueError(group_mode)
    # distinct, well-spread values so a wrong index or group shows
    args["codebooks"] = (torch.randn(num_groups, 1 << bits, generator=gen) * 2).to(codebook_dtype)
    if row_order:
        args["row_order"] = torch.randperm(rows, generator=gen).to(torch.int16)
    return args, idx


def naive_dequantize(args: dict[str, Any], idx: torch.Tensor) -> torch.Tensor:
    """W in fp32 by the definition, one element at a time from the unpacked indices."""
    rows, cols = idx.shape
    cb = args["codebooks"].float()
    num_groups = cb.shape[0]
    out = torch.empty(rows, cols)
    for r in range(rows):
        if args.get("groups") is not None:
            g = int(args["groups"][r])
        elif args.get("group_size") is not None:
            g = r // args["group_size"]
        else:
            g = r * num_groups // rows
        dest = int(args["row_order"][r]) if args.get("row_order") is not None else r
        for j in range(cols):
            out[dest, j] = cb[g, int(idx[r, j])]
    return out


@pytest.fixture
def quantized() -> Callable[..., tuple[dict[str, Any], torch.Tensor]]:
    return make_quantized


@pytest.fixture
def naive() -> Callable[[dict[str, Any], torch.Tensor], torch.Tensor]:
    return naive_dequantize


def linear_tolerance(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Allowed |error| of x @ w.T + bias in x's dtype: rounding w to x's dtype, fp32 sums in any order and the
    output rounding each cost at most a few eps of sum |x| |w| (+ |bias|)."""
    scale = x.float().abs() @ w.float().abs().T
    if bias is not None:
        scale = scale + bias.float().abs()
    return 2 * torch.finfo(x.dtype).eps * scale + 1e-5


@pytest.fixture
def tolerance() -> Callable[..., torch.Tensor]:
    return linear_tolerance
