"""Triton kernels against the torch references, run on CPU by triton's interpreter (tiny shapes: it is slow).

The grid crosses every bit width (1, 2, 3, 4, 8), shape (odd column counts included) and dtype (fp16, bf16,
fp32); group modes, row order, bias and batch (1, 3, 16) rotate across those cases, and separate tests sweep
each of them fully at one bit width, plus every lookup strategy, 5-7 bits, split-K and the dispatcher.
"""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported (read at decoration)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compress.kernels import dequantize, dequantize_ref, dispatch, quantized_linear  # noqa: E402
from compress.kernels.triton_dequant import dequantize_triton  # noqa: E402
from compress.kernels.triton_gemv import quantized_linear_triton  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":  # e.g. `TRITON_INTERPRET=0 pytest -m gpu`: the GPU tests cover these
    pytest.skip("interpreter tests need TRITON_INTERPRET=1", allow_module_level=True)

BITS = (1, 2, 3, 4, 8)
SHAPES = ((1, 8), (5, 13), (19, 37), (40, 70))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_MODES = ("even", "tensor", "group_size", "shared", "per_row")
CASES = [(bits, shape, dtype, i) for i, (bits, shape, dtype) in enumerate(itertools.product(BITS, SHAPES, DTYPES))]


def _ids(case: tuple) -> str:
    bits, (rows, cols), dtype, i = case
    return f"{bits}b-{rows}x{cols}-{str(dtype)[6:]}-{GROUP_MODES[i % 5]}{'-order' if i % 2 else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_dequantize_matches_reference(quantized, case: tuple) -> None:
    bits, (rows, cols), dtype, i = case
    args, _ = quantized(rows, cols, bits, GROUP_MODES[i % 5], num_groups=3, row_order=bool(i % 2), seed=i)
    got = dequantize_triton(**args, dtype=dtype)
    want = dequantize_ref(**args, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want), f"{(got.float() - want.float()).abs().max()} off"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_fused_linear_matches_reference(quantized, tolerance, case: tuple) -> None:
    bits, (rows, cols), dtype, i = case
    args, _ = quantized(rows, cols, bits, GROUP_MODES[i % 5], num_groups=4, row_order=bool(i % 2), seed=i)
    batch = (1, 3, 16)[(i // 3) % 3]
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(batch, cols, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype) if i % 4 != 3 else None
    got = quantized_linear_triton(x, **args, bias=bias)
    w = dequantize_ref(**args, dtype=torch.float32)
    want = x.float() @ w.T + (bias.float() if bias is not None else 0)
    err = (got.float() - want).abs()
    assert got.dtype == dtype and got.shape == (batch, rows)
    assert (err <= tolerance(x, w, bias)).all(), f"max error {err.max():.3g} (batch {batch}, {dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_mode", GROUP_MODES)
def test_every_dtype_and_group_mode(quantized, tolerance, dtype: torch.dtype, group_mode: str) -> None:
    args, _ = quantized(12, 29, 3, group_mode, num_groups=3, row_order=True, seed=7)
    assert torch.equal(dequantize_triton(**args, dtype=dtype), dequantize_ref(**args, dtype=dtype))
    x = torch.randn(2, 29).to(dtype)
    w = dequantize_ref(**args, dtype=torch.float32)
    err = (quantized_linear_triton(x, **args).float() - x.float() @ w.T).abs()
    assert (err <= tolerance(x, w, None)).all(), f"max error {err.max():.3g}"


LOOKUP_CASES = [("select", b) for b in (1, 2, 3)] + [("global", b) for b in (1, 3, 4, 8)] + \
               [("gather", b) for b in (3, 4, 8)]


@pytest.mark.parametrize("lookup, bits", LOOKUP_CASES, ids=[f"{lk}-{b}b" for lk, b in LOOKUP_CASES])
def test_every_lookup_strategy(quantized, tolerance, lookup: str, bits: int) -> None:
    args, _ = quantized(9, 45, bits, "tensor", num_groups=3, row_order=True, seed=bits)
    assert torch.equal(dequantize_triton(**args, lookup=lookup), dequantize_ref(**args))
    for batch in (1, 5):
        x = torch.randn(batch, 45, dtype=torch.float16)
        w = dequantize_ref(**args, dtype=torch.float32)
        err = (quantized_linear_triton(x, **args, lookup=lookup).float() - x.float() @ w.T).abs()
        assert (err <= tolerance(x, w, None)).all(), f"batch {batch}: max error {err.max():.3g}"


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_three_plane_widths(quantized, bits: int) -> None:
    args, _ = quantized(6, 21, bits, "even", seed=bits)
    assert torch.equal(dequantize_triton(**args), dequantize_ref(**args))


def test_tiles_loops_and_split_k(quantized, tolerance) -> None:
    """Several column tiles per program (split_c / split_k slices, the last tile partial) and atomics."""
    args, _ = quantized(10, 100, 2, "even", row_order=True, seed=3)
    want = dequantize_ref(**args)
    for cfg in ({"block_r": 2, "block_c": 16, "split_c": 1}, {"block_r": 4, "block_c": 8, "split_c": 3}):
        assert torch.equal(dequantize_triton(**args, **cfg), want), cfg
    w = dequantize_ref(**args, dtype=torch.float32)
    bias = torch.randn(10)
    for batch, cfg in ((1, {"block_c": 16, "split_k": 3}), (4, {"block_c": 16, "split_k": 2}),
                       (1, {"block_r": 2, "block_c": 32})):
        x = torch.randn(batch, 100)
        got = quantized_linear_triton(x, **args, bias=bias, **cfg)
        err = (got - (x @ w.T + bias)).abs()
        assert (err <= tolerance(x, w, bias)).all(), f"{cfg}: max error {err.max():.3g}"


def test_out_workspace_and_empty_shapes(quantized) -> None:
    args, _ = quantized(6, 11, 4, "even")
    out = torch.full((6, 11), float("nan"), dtype=torch.bfloat16)
    assert dequantize_triton(**args, out=out) is out
    assert torch.equal(out, dequantize_ref(**args, dtype=torch.bfloat16))
    empty = {**args, "packed": args["packed"][:0], "codebooks": args["codebooks"][:1]}
    assert dequantize_triton(**empty).shape == (0, 11)
    x = torch.randn(0, 11)
    assert quantized_linear_triton(x, **args).shape == (0, 6)


def test_bad_options_are_named(quantized) -> None:
    args, _ = quantized(4, 16, 4, "even")
    with pytest.raises(ValueError, match="lookup 'select' keeps at most 8"):
        dequantize_triton(**args, lookup="select")
    with pytest.raises(ValueError, match="unknown lookup 'lut'.*select, global, gather"):
        dequantize_triton(**args, lookup="lut")
    with pytest.raises(ValueError, match=r"unknown dequantize option\(s\) \['blok_r'\]"):
        dequantize_triton(**args, blok_r=4)
    with pytest.raises(ValueError, match="x must be"):
        quantized_linear_triton(torch.randn(17, 16), **args)


def test_dispatch_forced_to_triton_on_cpu(quantized, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPRESS_FORCE_TRITON=1 sends CPU tensors through the (interpreted) kernels; large batches dequantize."""
    args, _ = quantized(8, 24, 2, "even", row_order=True)
    calls: list[str] = []
    from compress.kernels import triton_dequant, triton_gemv

    monkeypatch.setattr(triton_dequant, "dequantize_triton",
                        lambda *a, **k: calls.append("dequant") or dequantize_triton(*a, **k))
    monkeypatch.setattr(triton_gemv, "quantized_linear_triton",
                        lambda *a, **k: calls.append("fused") or quantized_linear_triton(*a, **k))
    monkeypatch.setenv(dispatch.FORCE_TRITON_ENV, "1")
    assert dispatch.use_triton("cpu")
    w = dequantize(**args)
    assert torch.equal(w, dequantize_ref(**args)) and calls == ["dequant"]
    x = torch.randn(2, 3, 24)
    y = quantized_linear(x, **args)  # 6 rows of x: fused
    big = quantized_linear(torch.randn(20, 24), **args)  # > MAX_FUSED_BATCH: dequantize + F.linear
    assert calls == ["dequant", "fused", "dequant"] and y.shape == (2, 3, 8) and big.shape == (20, 8)
    assert torch.allclose(y, x @ w.float().T, atol=1e-3)
    monkeypatch.delenv(dispatch.FORCE_TRITON_ENV)
    assert not dispatch.use_triton("cpu")


def test_fused_path_adds_a_bias_that_wants_a_gradient_outside_the_kernel(quantized, tolerance) -> None:
    args, _ = quantized(6, 16, 3, "tensor", row_order=True, seed=11)
    w = dequantize_ref(**args, dtype=torch.float32)
    bias = torch.randn(6, requires_grad=True)
    x = torch.randn(2, 4, 16)
    assert dispatch.fused_applies(x) and not dispatch.fused_applies(torch.randn(17, 16))
    assert not dispatch.fused_applies(torch.randn(0, 16)) and dispatch.fused_applies(x, max_batch=8)
    assert not dispatch.fused_applies(x, max_batch=7)
    y = quantized_linear(x, **args, bias=bias, backend="triton")  # fused (x wants no gradient)
    assert y.shape == (2, 4, 6) and y.requires_grad
    y.sum().backward()
    assert torch.equal(bias.grad, torch.full((6,), 8.0))
    want = x @ w.T + bias.detach()
    assert ((y.detach() - want).abs() <= tolerance(x.reshape(-1, 16), w, bias.detach()).reshape(2, 4, 6)).all()
    with torch.no_grad():  # no gradient wanted at all: the bias goes into the kernel
        assert torch.allclose(dispatch.fused_linear(x, **args, bias=bias), y.detach(), atol=1e-5)
