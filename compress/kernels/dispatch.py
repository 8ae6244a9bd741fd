"""Pick the implementation: the Triton kernels on CUDA tensors, the torch references elsewhere.

`dequantize` and `quantized_linear` take the quantized matrix as described in `compress.kernels.reference`
(packed, codebooks, bits, cols, and optionally groups / group_size, row_order). The backend is
- "auto" (default): Triton when the tensors are on a CUDA device and triton is installed, or everywhere when
  the environment has COMPRESS_FORCE_TRITON=1 (CPU tensors then run in triton's interpreter: TRITON_INTERPRET=1
  must be set before the first Triton call; for tests); torch otherwise;
- "triton" / "torch": that one (torch = `torch_dequant.dequantize_torch`, table-driven, + F.linear).
A call's `backend="auto"` defers to the process-wide setting: `set_backend(name)` / `with kernel_backend(name):`,
else the environment variable COMPRESS_KERNELS=auto|torch|triton, else "auto" as above (`configured_backend`).
The quantized layers (`compress.format.layers`) follow the same setting.
Triton is imported here only inside the Triton path, so `import compress.kernels` never imports it.

`codebook_kernel_args(layout, buffers)` turns a `compress.format.weights` "codebook" layout and its tensors into
these arguments (scale and offset folded into fp32 codebooks, the row map into a group per row).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from functools import lru_cache
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F

from compress.format.packing import pack_indices, unpack_indices
from compress.format.weights import matrix_shape, row_groups
from compress.kernels.reference import check_quantized
from compress.kernels.torch_dequant import dequantize_torch

__all__ = ["dequantize", "quantized_linear", "fused_linear", "fused_applies", "codebook_kernel_args", "use_triton",
           "set_backend", "configured_backend", "kernel_backend", "BACKENDS", "FORCE_TRITON_ENV", "KERNELS_ENV",
           "MAX_FUSED_BATCH"]

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
FORCE_TRITON_ENV = "COMPRESS_FORCE_TRITON"
KERNELS_ENV = "COMPRESS_KERNELS"
MAX_FUSED_BATCH = 16  # rows of x the fused kernel takes; more: dequantize once, then F.linear

_BACKEND: Backend | None = None  # set_backend(); None: the environment decides


def set_backend(backend: Backend | None) -> None:
    """Process-wide backend of calls that pass backend="auto" (and of the quantized layers); None: back to the
    environment (COMPRESS_KERNELS, default "auto")."""
    global _BACKEND
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    _BACKEND = backend


def configured_backend() -> Backend:
    """The process-wide backend: `set_backend`'s, else $COMPRESS_KERNELS, else "auto"."""
    if _BACKEND is not None:
        return _BACKEND
    value = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} is not a kernel backend "
                         f"(known: {', '.join(BACKENDS)})")
    return value  # type: ignore[return-value]


@contextlib.contextmanager
def kernel_backend(backend: Backend | None) -> Iterator[None]:
    """`set_backend(backend)` inside the block, the previous setting after it (not thread-local)."""
    global _BACKEND
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    previous, _BACKEND = _BACKEND, backend
    try:
        yield
    finally:
        _BACKEND = previous


def use_triton(device: torch.device | str, backend: Backend = "auto") -> bool:
    """Whether tensors on `device` go through the Triton kernels (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        backend = configured_backend()
    if backend != "auto":
        return backend == "triton"
    if os.environ.get(FORCE_TRITON_ENV, "0") not in ("", "0"):
        return True
    return torch.device(device).type == "cuda" and _triton_installed()


@lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels(name: str, device: torch.device) -> ModuleType:
    """The Triton module `compress.kernels.<name>`, imported now; checks that it can run on `device`."""
    import importlib

    from compress.kernels import triton_common  # imports triton

    if device.type != "cuda" and not triton_common.INTERPRET:
        raise RuntimeError(f"Triton kernels on {device.type} tensors run in triton's interpreter: set "
                           "TRITON_INTERPRET=1 before the first Triton call of the process (the kernels were "
                           "compiled for the GPU), or use backend='torch'")
    return importlib.import_module(f"compress.kernels.{name}")


def dequantize(packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
               groups: torch.Tensor | None = None, group_size: int | None = None,
               row_order: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
               backend: Backend = "auto") -> torch.Tensor:
    """The dense matrix W [rows, cols] in `dtype` (reshape it for a conv weight)."""
    if use_triton(packed.device, backend):
        return _kernels("triton_dequant", packed.device).dequantize_triton(
            packed, codebooks, bits, cols, groups=groups, group_size=group_size, row_order=row_order, dtype=dtype)
    return dequantize_torch(packed, codebooks, bits, cols, groups=groups, group_size=group_size,
                            row_order=row_order, dtype=dtype)


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                     groups: torch.Tensor | None = None, group_size: int | None = None,
                     row_order: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     backend: Backend = "auto") -> torch.Tensor:
    """F.linear(x, W, bias): x [..., cols] -> [..., rows] in x's dtype.

    Triton: up to MAX_FUSED_BATCH rows of x (and no gradient wanted for x) go through the fused kernel, which
    never materialises W (a bias that wants a gradient is added after it); otherwise W is dequantized (Triton)
    and F.linear runs. Torch: dequantize_torch + F.linear (on CPU, cache the dense weight instead of calling
    this every step).
    """
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {cols} columns")
    quant = {"groups": groups, "group_size": group_size, "row_order": row_order}
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    if use_triton(x.device, backend):
        if fused_applies(x):
            y = fused_linear(x2, packed, codebooks, bits, cols, bias=bias, **quant)
        else:
            w = _kernels("triton_dequant", x.device).dequantize_triton(packed, codebooks, bits, cols,
                                                                         dtype=x.dtype, **quant)
            y = F.linear(x2, w, bias)
    else:
        y = F.linear(x2, dequantize_torch(packed, codebooks, bits, cols, dtype=x.dtype, **quant), bias)
    return y.reshape(*lead, rows)


def fused_applies(x: torch.Tensor, max_batch: int = MAX_FUSED_BATCH) -> bool:
    """Whether `quantized_linear` on the Triton path takes the fused kernel for x [..., cols]: at most
    `max_batch` (<= MAX_FUSED_BATCH) rows, at least one, and no gradient wanted for x (the kernel has no
    backward)."""
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return 0 < tokens <= min(max_batch, MAX_FUSED_BATCH) and x.shape[-1] > 0 and \
        not (torch.is_grad_enabled() and x.requires_grad)


def fused_linear(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor, bits: int, cols: int, *,
                 groups: torch.Tensor | None = None, group_size: int | None = None,
                 row_order: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused Triton kernel, always: x [..., cols] with at most MAX_FUSED_BATCH rows -> [..., rows] in x's
    dtype; W is decoded tile by tile in registers, never stored. No gradient flows to x; a bias that wants one
    is added outside the kernel."""
    rows = check_quantized(packed, codebooks, bits, cols, groups, group_size, row_order)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    grad_bias = bias is not None and torch.is_grad_enabled() and bias.requires_grad
    y = _kernels("triton_gemv", x.device).quantized_linear_triton(
        x2, packed, codebooks, bits, cols, groups=groups, group_size=group_size, row_order=row_order,
        bias=None if grad_bias else bias)
    if grad_bias:
        y = y + bias
    return y.reshape(*lead, rows)


def codebook_kernel_args(layout: dict[str, Any], buffers: dict[str, torch.Tensor],
                         column_scale_by_caller: bool = False) -> dict[str, Any]:
    """Arguments of `dequantize` / `quantized_linear` for a "codebook" layout of `compress.format.weights`.

    Returns {packed, codebooks, bits, cols, groups}: codebooks are the stored fp16 ones when the layout has
    per-group codebooks and no scale or offset, else fp32 [G, 2^b] with base * scale + offset folded in (the
    same fp32 arithmetic as `formats.decode`, so results match it exactly); groups is int32 [rows] from the
    row map, or None when every row reads codebook 0 or row r reads codebook r. Small tensor ops only: cache
    the result while the buffers do not change. The matrix is [rows, cols]; reshape to layout["shape"].
    A layout with column scales (`buffers["column_scale"]`, a factor per column) is taken only when the caller
    applies them (`column_scale_by_caller`: on the decoded columns, or on the input of a fused linear).
    """
    if layout["format"] != "codebook":
        raise ValueError(f"no kernel for the '{layout['format']}' format (kernels: codebook); "
                         "decode it with compress.format.weights.decode")
    if layout.get("column_scale", False) and not column_scale_by_caller:
        raise ValueError("the kernels do not apply column scales: pass column_scale_by_caller=True and multiply "
                         "the decoded columns (or the fused linear's input) by buffers['column_scale']")
    rows, cols = matrix_shape(layout["shape"])
    bits, kind = layout["bits"], layout["codebook"]
    packed = buffers["packed"]
    if layout.get("packing", "rows") == "flat":  # short rows are stored as one flat stream: kernels want rows
        packed = pack_indices(unpack_indices(packed, bits, rows * cols).reshape(rows, cols), bits)
    if kind == "grid":
        base = torch.arange(1 << bits, dtype=torch.float32, device=packed.device)[None, :]
    else:
        base = buffers["codebook"]
    if kind == "per-group" and not layout["scale"] and not layout["offset"]:
        codebooks = base
    else:
        table = base.float()
        if layout["scale"]:
            table = table * buffers["scale"].float()[:, None]
        if layout["offset"]:
            table = table + buffers["offset"].float()[:, None]
        codebooks = table.contiguous()
    groups = None
    if codebooks.shape[0] > 1 and not (layout["row_map"] == "none" and codebooks.shape[0] == rows):
        groups = row_groups(layout, buffers).to(torch.int32)
    return {"packed": packed, "codebooks": codebooks, "bits": bits, "cols": cols, "groups": groups}
