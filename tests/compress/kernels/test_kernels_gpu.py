"""Compiled Triton kernels on a CUDA GPU against the torch references, at shapes the interpreter cannot afford.

The checks run in a fresh process with TRITON_INTERPRET=0 (this session's conftest turns the interpreter on,
and triton reads it when kernels are decorated); `python tests/compress/kernels/test_kernels_gpu.py` runs them
directly. Skipped without CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_compiled_kernels_match_reference_on_gpu() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all GPU kernel checks passed" in done.stdout, done.stdout[-4000:]


def _checks(device: str = "cuda", shapes: tuple = ((4096, 4096), (1000, 3001), (257, 129), (8192, 8192)),
            wide: int = 4096) -> None:
    import itertools

    from compress.kernels import dequantize, dequantize_ref, quantized_linear
    from compress.kernels.triton_dequant import dequantize_triton
    from compress.kernels.triton_gemv import quantized_linear_triton
    from compress.format.packing import pack_indices

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    for (rows, cols), bits in itertools.product(shapes, (1, 2, 3, 4, 8)):
        if rows * cols > 2 ** 25 and bits not in (2, 3, 4):
            continue
        idx = torch.randint(0, 1 << bits, (rows, cols), device=dev, generator=gen)
        packed = pack_indices(idx, bits)
        num_groups = 16
        codebooks = torch.randn(num_groups, 1 << bits, device=dev, generator=gen).half()
        order = torch.randperm(rows, device=dev, generator=gen).to(torch.int16 if rows <= 32767 else torch.int32)
        groups = torch.randint(0, num_groups, (rows,), device=dev, generator=gen, dtype=torch.int32)
        for quant in ({}, {"row_order": order}, {"groups": groups, "row_order": order}):
            w32 = dequantize_ref(packed, codebooks, bits, cols, dtype=torch.float32, **quant)
            for dtype in (torch.float16, torch.bfloat16):
                got = dequantize(packed, codebooks, bits, cols, dtype=dtype, **quant)
                assert torch.equal(got, w32.to(dtype)), f"dequantize {rows}x{cols} {bits}b {dtype} {list(quant)}"
            lookups = [None, "global"] if bits <= 3 else [None]  # "gather" is opt-in: compile_check covers it
            for batch, dtype, lookup in itertools.product((1, 4, 16), (torch.float16, torch.bfloat16), lookups):
                x = torch.randn(batch, cols, device=dev, generator=gen).to(dtype)
                bias = torch.randn(rows, device=dev, generator=gen).to(dtype)
                want = x.float() @ w32.T + bias.float()
                tol = 2 * torch.finfo(dtype).eps * (x.float().abs() @ w32.abs().T + bias.float().abs()) + 1e-4
                got = quantized_linear_triton(x, packed, codebooks, bits, cols, bias=bias, lookup=lookup, **quant)
                err = (got.float() - want).abs()
                assert (err <= tol).all(), f"linear {rows}x{cols} {bits}b B={batch} {dtype} {lookup}: {err.max()}"
            x = torch.randn(3, 64, cols, device=dev, generator=gen).half()  # 192 rows: dequantize + F.linear
            y = quantized_linear(x, packed, codebooks, bits, cols, **quant)
            assert torch.allclose(y.float(), x.float() @ w32.T, rtol=2e-2, atol=2e-2 * cols ** 0.5)
        print(f"ok {rows}x{cols} {bits} bits", flush=True)
    # split-K (atomics) and explicit tiles
    idx = torch.randint(0, 4, (512, wide), device=dev, generator=gen)
    packed, codebooks = pack_indices(idx, 2), torch.randn(4, 4, device=dev, generator=gen).half()
    w32 = dequantize_ref(packed, codebooks, 2, wide, dtype=torch.float32)
    x = torch.randn(1, wide, device=dev, generator=gen).half()
    for cfg in ({"split_k": 4}, {"block_r": 16, "block_c": 256, "num_warps": 8}, {"stages": 1}):
        err = (quantized_linear_triton(x, packed, codebooks, 2, wide, **cfg).float() - x.float() @ w32.T).abs()
        assert err.max() < 0.05, (cfg, err.max())
    assert torch.equal(dequantize_triton(packed, codebooks, 2, wide, block_r=8, block_c=128, split_c=3),
                       w32.half())
    print("all GPU kernel checks passed")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run with TRITON_INTERPRET=0"
    _checks()
