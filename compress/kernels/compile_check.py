"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and report their resource use.

Each launcher (`dequantize_launch`, `quantized_linear_launch`) builds its real arguments from CPU tensors;
`JITFunction.warmup` then specialises and compiles them exactly as a launch would (argument divisibility and
alignment included) while a stand-in driver names the target (default sm_90, the H100). That catches what the
interpreter cannot (code generation, layouts, `tl.dot` and `tl.gather` lowering, constexpr rules) and gives
the registers, spills and shared memory of every kernel variant from `cuobjdump`. It proves nothing about
speed or numerics on a GPU: those need one (`tools/bench_kernels.py`, the `gpu` tests).

    python -m compress.kernels.compile_check [--arch 90] [--cases smoke|quick|full]

Needs TRITON_INTERPRET unset or 0 (the interpreter replaces compilation) and triton's bundled ptxas.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["compile_dequantize", "compile_quantized_linear", "resource_usage", "main"]


class _TargetOnlyDriver:
    """Enough of a triton driver to compile (never to launch) for `target` without a GPU."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def _target(arch: int) -> Iterator[None]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset or 0 (the interpreter does not compile)")
    from triton.runtime import driver

    previous = driver._active  # None until a driver was used; reset_active() would look for a GPU
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def resource_usage(kernel: Any) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL (bytes of spills per thread) of a compiled kernel's cubin, via cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_dequantize(bits: int, rows: int, cols: int, arch: int = 90, **kwargs: Any) -> Any:
    """The compiled `_dequant_kernel` for a rows x cols matrix (kwargs: those of `dequantize_launch`)."""
    from compress.kernels.triton_dequant import _dequant_kernel, dequantize_launch

    packed, codebooks, groups, order = _operands(bits, rows, cols, kwargs)
    grid, args, meta, _ = dequantize_launch(packed, codebooks, bits, cols, groups=groups, row_order=order, **kwargs)
    with _target(arch):
        return _dequant_kernel.warmup(*args, grid=grid, **meta)


def compile_quantized_linear(bits: int, rows: int, cols: int, batch: int = 1, dtype: torch.dtype = torch.float16,
                             arch: int = 90, **kwargs: Any) -> Any:
    """The compiled `_qlinear_kernel` (kwargs: those of `quantized_linear_launch`, bias=True for a bias)."""
    from compress.kernels.triton_gemv import _qlinear_kernel, quantized_linear_launch

    packed, codebooks, groups, order = _operands(bits, rows, cols, kwargs)
    bias = torch.zeros(rows, dtype=dtype) if kwargs.pop("bias", False) else None
    x = torch.zeros(batch, cols, dtype=dtype)
    grid, args, meta, _ = quantized_linear_launch(x, packed, codebooks, bits, cols, groups=groups, row_order=order,
                                                  bias=bias, **kwargs)
    with _target(arch):
        return _qlinear_kernel.warmup(*args, grid=grid, **meta)


def _operands(bits: int, rows: int, cols: int, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    from compress.kernels.reference import packed_cols

    num_groups = kwargs.pop("num_groups", 4)
    packed = torch.zeros(rows, packed_cols(cols, bits), dtype=torch.uint8)
    codebooks = torch.zeros(num_groups, 1 << bits, dtype=kwargs.pop("codebook_dtype", torch.float16))
    groups = torch.zeros(rows, dtype=torch.int32) if kwargs.pop("group_ids", False) else None
    order = torch.arange(rows, dtype=torch.int16) if kwargs.pop("row_order", False) else None
    return packed, codebooks, groups, order


SMOKE = [("dequantize", {"bits": 3, "row_order": True}),
         ("dequantize", {"bits": 4, "group_ids": True, "dtype": torch.bfloat16}),
         ("linear", {"bits": 2, "batch": 1, "bias": True, "row_order": True}),
         ("linear", {"bits": 3, "batch": 8, "dtype": torch.bfloat16, "group_ids": True}),
         ("linear", {"bits": 4, "batch": 1, "split_k": 2, "bias": True}),
         ("linear", {"bits": 8, "batch": 4, "dtype": torch.float32})]


def _cases(which: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if which == "smoke":
        yield from SMOKE
        return
    quick = which == "quick"
    for bits in (1, 2, 3, 4, 8) if quick else range(1, 9):
        lookups = (["select"] if bits <= 3 else []) + ["global"] + (["gather"] if bits >= 3 else [])
        for lookup in lookups[:1] if quick else lookups:
            yield "dequantize", {"bits": bits, "lookup": lookup, "row_order": True}
            for batch, dtype in ((1, torch.float16), (8, torch.float16), (16, torch.bfloat16), (4, torch.float32)):
                yield "linear", {"bits": bits, "lookup": lookup, "batch": batch, "dtype": dtype, "bias": True}
    yield "dequantize", {"bits": 2, "group_ids": True, "dtype": torch.bfloat16}
    yield "linear", {"bits": 3, "batch": 1, "split_k": 4, "bias": True, "row_order": True, "group_ids": True}
    yield "linear", {"bits": 4, "batch": 2, "split_k": 2, "dtype": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    parser.add_argument("--cases", choices=["smoke", "quick", "full"], default="quick",
                        help="smoke: 6 kernels; quick: default lookups at 1, 2, 3, 4, 8 bits; "
                             "full: every lookup, 1-8 bits")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args(argv)
    print(f"| kernel | case | REG | LOCAL (spill bytes) | SHARED |\n|---|---|---|---|---|")
    worst, failed = 0, 0
    for kind, case in _cases(args.cases):
        label = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in case.items())
        compile_fn = compile_dequantize if kind == "dequantize" else compile_quantized_linear
        try:
            kernel = compile_fn(rows=args.rows, cols=args.cols, arch=args.arch, **dict(case))
        except RuntimeError as exc:  # reported and counted: e.g. tl.gather's lowering asserts on some tiles
            failed += 1
            print(f"| {kind} | {label} | compile failed: {str(exc).splitlines()[0][:80]} | | |")
            continue
        use = resource_usage(kernel)
        worst = max(worst, use.get("LOCAL", 0))
        print(f"| {kind} | {label} | {use.get('REG')} | {use.get('LOCAL')} | {kernel.metadata.shared} |")
    print(f"\ncompiled for sm_{args.arch}: {failed} failed; largest spill: {worst} bytes per thread")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
