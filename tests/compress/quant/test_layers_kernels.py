"""Quantized layers through `compress.kernels`: the Triton path against the torch path.

On CPU the Triton path is forced (`kernel_backend("triton")`) and runs in triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before any kernel module is imported): tiny layers, 1, 2, 3, 4 and 8 bits, "rows" and
"flat" packing, conv (dequantize kernel + F.conv2d) and linear (fused kernel at <= FUSED_MAX_TOKENS rows of
input, dequantize kernel + F.linear above), fallbacks, caches, gradients; plus MAC counting of quantized layers.
On a GPU, `pytest -m gpu` runs the compiled kernels through the layers at real sizes in a fresh process with
TRITON_INTERPRET=0 (or directly: `TRITON_INTERPRET=0 python tests/compress/quant/test_layers_kernels.py`); the
same checks run here on CPU, tiny and interpreted, so they stay correct without a GPU.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported (read at decoration)

import copy  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from compress.kernels import dispatch, kernel_backend  # noqa: E402
from compress.format import layers  # noqa: E402
from compress.format.weights import empty_buffers, encode_codebook, matrix_shape  # noqa: E402
from compress.format.layers import FUSED_MAX_TOKENS, QuantizedWeight, attach_quantized  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreter = pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels in triton's interpreter: needs triton and "
                                        "TRITON_INTERPRET=1")

# layouts of formats.encode_codebook: (codebook kind, row map, groups (0: one per row), scale, offset, column scales)
LAYOUTS = {"per-group": ("per-group", "group-ids", 3, False, False, False),
           "order": ("per-group", "order", 2, False, False, False),
           "per-row": ("per-group", "none", 0, False, False, False),
           "grid": ("grid", "none", 0, True, True, False),  # per-row affine int-b (rtn)
           "shared": ("shared", "none", 1, True, False, False),
           "columns": ("per-group", "group-ids", 3, False, False, True)}  # JLCM's activation-aware column scales


def quantize(module: nn.Module, bits: int, layout: str = "per-group", attr: str = "weight", seed: int = 0) -> nn.Module:
    """Give `module.<attr>` a random stored form of `layout` at `bits` (on the module's device and dtype)."""
    weight = getattr(module, attr)
    rows, cols = matrix_shape(weight.shape)
    kind, row_map, num_groups, with_scale, with_offset, with_columns = LAYOUTS[layout]
    num_groups = num_groups or rows
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    order = torch.randperm(rows, generator=gen)
    if row_map == "order":  # position p of the order is in group floor(p * G / rows)
        groups = torch.empty(rows, dtype=torch.long)
        groups[order] = torch.arange(rows) * num_groups // rows
    else:
        groups = torch.arange(rows) % num_groups
    codebook = None if kind == "grid" else \
        torch.randn(num_groups if kind == "per-group" else 1, 1 << bits, generator=gen) * 0.5
    scale = (torch.rand(num_groups, generator=gen) + 0.5) / (1 << bits) if with_scale else None
    offset = torch.randn(num_groups, generator=gen) * 0.1 if with_offset else None
    column_scale = torch.rand(cols, generator=gen) + 0.5 if with_columns else None
    stored, buffers = encode_codebook(weight.shape, bits, idx, groups, num_groups, codebook, kind, scale, offset,
                                      row_map, order, column_scale)
    return attach_quantized(module, stored, {k: v.to(weight.device) for k, v in buffers.items()}, attr)


def linear_tolerance(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """|error| allowed for x @ w.T + bias in x's dtype (w exact): a few eps of sum |x| |w| (+ |bias|)."""
    scale = x.float().abs().reshape(-1, x.shape[-1]) @ w.float().abs().T
    if bias is not None:
        scale = scale + bias.float().abs()
    return (4 * torch.finfo(x.dtype).eps * scale + 1e-5).reshape(*x.shape[:-1], -1)


@contextmanager
def counting_kernels() -> Iterator[list[str]]:
    """Records the Triton kernels that run ("dequant", "fused"), by wrapping their entry points."""
    from compress.kernels import triton_dequant, triton_gemv

    calls: list[str] = []
    dequant, fused = triton_dequant.dequantize_triton, triton_gemv.quantized_linear_triton
    triton_dequant.dequantize_triton = lambda *a, **k: calls.append("dequant") or dequant(*a, **k)
    triton_gemv.quantized_linear_triton = lambda *a, **k: calls.append("fused") or fused(*a, **k)
    try:
        yield calls
    finally:
        triton_dequant.dequantize_triton, triton_gemv.quantized_linear_triton = dequant, fused


# (bits, packing): 8-bit rows always fill whole bytes, so there is no flat 8-bit layout
CASES = [(bits, packing) for bits in (1, 2, 3, 4, 8) for packing in ("rows", "flat")
         if not (bits == 8 and packing == "flat")]
CASE_IDS = [f"{b}b-{p}" for b, p in CASES]


@interpreter
@pytest.mark.parametrize("bits, packing", CASES, ids=CASE_IDS)
def test_conv_through_dequantize_kernel_matches_torch_path(bits: int, packing: str) -> None:
    i = CASES.index((bits, packing))
    # 16 weights a row fill whole bytes at every width; 27 (3 x 3 x 3) do not
    conv = nn.Conv2d(4, 6, 2, padding=1) if packing == "rows" else nn.Conv2d(3, 6, 3, padding=1)
    layout = list(LAYOUTS)[i % len(LAYOUTS)]
    quantize(conv, bits, layout, seed=i)
    assert conv.quant_layout["packing"] == packing
    x = torch.randn(2, conv.in_channels, 5, 5)
    with torch.no_grad():
        with counting_kernels() as calls, kernel_backend("triton"):
            got_w, got = conv.weight, conv(x)
        assert calls == ["dequant", "dequant"], "the weight is decoded by the kernel at each use"
        assert conv.__dict__.get("_dense_cache") is None, "the Triton path keeps no dense copy"
        with kernel_backend("torch"):
            want_w, want = conv.weight, conv(x)
    assert got_w.dtype == want_w.dtype == torch.float32
    assert torch.equal(got_w, want_w), f"{layout}: the kernel decodes another weight"
    assert torch.equal(got, want)


@interpreter
@pytest.mark.parametrize("bits, packing", CASES, ids=CASE_IDS)
def test_linear_fused_at_small_batch_and_dequantized_above(bits: int, packing: str) -> None:
    i = CASES.index((bits, packing))
    lin = nn.Linear(16 if packing == "rows" else 13, 10)
    layout = list(LAYOUTS)[(i + 2) % len(LAYOUTS)]
    quantize(lin, bits, layout, seed=i)
    assert lin.quant_layout["packing"] == packing
    gen = torch.Generator().manual_seed(i)
    xs = [torch.randn(1, lin.in_features, generator=gen), torch.randn(3, 2, lin.in_features, generator=gen),
          torch.randn(FUSED_MAX_TOKENS + 1, lin.in_features, generator=gen)]
    with torch.no_grad():
        with counting_kernels() as calls, kernel_backend("triton"):
            got = [lin(x) for x in xs]
        with kernel_backend("torch"):
            w = lin.weight
            want = [lin(x) for x in xs]
    assert calls == ["fused", "fused", "dequant"], calls
    for x, y, ref in zip(xs, got, want):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert ((y - ref).abs() <= linear_tolerance(x, w, lin.bias)).all(), f"{layout}: {(y - ref).abs().max()}"
    assert torch.equal(got[2], want[2]), "dequantize kernel + F.linear is the torch path's F.linear"


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype: torch.dtype) -> None:
    lin = quantize(nn.Linear(24, 8), 3, "grid", seed=1).to(dtype)
    conv = quantize(nn.Conv2d(3, 4, 3), 4, "order", seed=2).to(dtype)
    assert lin.weight_scale.dtype == conv.weight_codebook.dtype == torch.float16, \
        "stored tensors keep their dtypes under .to(dtype)"
    x = torch.randn(2, 24).to(dtype)
    with torch.no_grad():
        with counting_kernels() as calls, kernel_backend("triton"):
            got, got_w = lin(x), conv.weight
        with kernel_backend("torch"):
            want, want_w, w = lin(x), conv.weight, lin.weight
    assert calls == ["fused", "dequant"]
    assert got.dtype == dtype and got_w.dtype == dtype and torch.equal(got_w, want_w)
    assert ((got.float() - want.float()).abs() <= 2 * linear_tolerance(x, w, lin.bias)).all()


@interpreter
def test_multihead_attention_reads_kernel_decoded_weights() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    quantize(mha, 2, "per-group", attr="in_proj_weight", seed=3)
    quantize(mha.out_proj, 4, "per-row", seed=4)  # read by the attention function as out_proj.weight
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        with counting_kernels() as calls, kernel_backend("triton"):
            got, _ = mha(x, x, x)
        with kernel_backend("torch"):
            want, _ = mha(x, x, x)
    assert sorted(set(calls)) == ["dequant"], calls
    assert torch.allclose(got, want, atol=1e-5)


@interpreter
def test_layouts_without_kernel_fall_back_to_torch_with_one_log(caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "_FALLBACKS_LOGGED", set())
    nf4 = nn.Linear(64, 4)
    stored = {"format": "nf4", "shape": [4, 64], "blocksize": 64, "double_quant": False, "packing": "rows"}
    buffers = empty_buffers(stored)
    buffers["packed"] = torch.randint(0, 256, buffers["packed"].shape, dtype=torch.uint8)
    buffers["absmax"] = torch.rand(buffers["absmax"].shape)
    attach_quantized(nf4, stored, buffers)
    wide = quantize(nn.Linear(16, 4), 2).double()
    x = torch.randn(2, 64)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=layers.__name__):
        with counting_kernels() as calls, kernel_backend("triton"):
            got = [nf4(x), nf4(x), wide(x[:, :16].double()), wide.weight]
        with kernel_backend("torch"):
            want = [nf4(x), nf4(x), wide(x[:, :16].double()), wide.weight]
    assert calls == [], "no kernel for nf4 nor for float64"
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    messages = [r.getMessage() for r in caplog.records if r.name == layers.__name__]
    assert len(messages) == 2, messages  # once per reason, not per call
    assert "'nf4' format has no kernel" in messages[0] and "torch.float64" in messages[1]


@interpreter
def test_gradients_on_the_triton_path() -> None:
    lin = quantize(nn.Linear(16, 6), 2, "order", seed=5)
    with kernel_backend("torch"):
        w = lin.weight.detach()
    x = torch.randn(2, 16, requires_grad=True)
    with counting_kernels() as calls, kernel_backend("triton"):
        lin(x).sum().backward()  # x wants a gradient: dequantize + F.linear, not the fused kernel
        assert calls == ["dequant"]
        assert torch.allclose(x.grad, w.sum(0).expand(2, 16)) and torch.equal(lin.bias.grad, torch.full((6,), 2.0))
        lin.bias.grad = None
        y = lin(torch.randn(2, 16))  # only the bias wants one: fused, the bias added after the kernel
        assert calls == ["dequant", "fused"] and y.requires_grad
        y.sum().backward()
    assert torch.equal(lin.bias.grad, torch.full((6,), 2.0))


@interpreter
def test_kernel_arguments_are_cached_until_a_stored_tensor_changes() -> None:
    lin = quantize(nn.Linear(13, 6), 3, "grid", seed=6)  # flat packing, scale + offset folded: real work
    with torch.no_grad(), kernel_backend("triton"):
        args = lin.kernel_args()
        assert lin.kernel_args() is args
        lin(torch.randn(1, 13))
        assert lin.kernel_args() is args, "a forward reuses the cached arguments"
        lin.weight_scale.mul_(2)  # in place
        changed = lin.kernel_args()
        assert changed is not args
        lin.weight_packed = lin.weight_packed.clone()  # replaced, same values
        assert lin.kernel_args() is not changed
        got = lin.weight
        clone = copy.deepcopy(lin)
        assert clone.__dict__.get("_kernel_cache") is None, "copies leave the caches behind"
        assert torch.equal(clone.weight, got)
    with torch.no_grad(), kernel_backend("torch"):
        assert torch.equal(lin.weight, got)


@interpreter
def test_backend_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = quantize(nn.Linear(16, 4), 4, seed=7)
    x = torch.randn(1, 16)
    monkeypatch.delenv(dispatch.FORCE_TRITON_ENV, raising=False)
    for env, expected in (("triton", ["fused"]), ("torch", []), ("auto", []), ("", [])):
        monkeypatch.setenv(dispatch.KERNELS_ENV, env)
        with torch.no_grad(), counting_kernels() as calls:
            lin(x)
        assert calls == expected, f"{dispatch.KERNELS_ENV}={env!r}"
    monkeypatch.setenv(dispatch.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="COMPRESS_KERNELS='cuda' is not a kernel backend"):
        lin(x)


def test_macs_of_quantized_layers_do_not_depend_on_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_pruning.utils import op_counter

    from compress.evaluate.size import count_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(1, 3, 4, 4)
    dense = count_macs(model, x)
    quantize(model[0], 2)
    quantize(model[3], 4)
    for module in (model[0], model[3]):  # as if the classes were made before torch-pruning was importable
        monkeypatch.delitem(op_counter.MODULES_MAPPING, type(module), raising=False)
    assert count_macs(model, x) == dense > 0


def test_cpu_forward_under_auto_stays_off_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU ("auto") the layers decode with torch (cached): the Triton kernel modules are never asked for."""
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.delenv(dispatch.FORCE_TRITON_ENV, raising=False)
    asked: list[str] = []
    monkeypatch.setattr(dispatch, "_kernels", lambda name, device: asked.append(name))
    lin = quantize(nn.Linear(16, 4), 2)
    conv = quantize(nn.Conv2d(2, 3, 3), 3)
    with torch.no_grad():
        lin(torch.randn(1, 16))
        conv(torch.randn(1, 2, 4, 4))
        assert lin.weight is lin.weight, "CPU keeps the decoded weight"
    assert asked == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_run_the_compiled_kernels_on_gpu() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all GPU layer checks passed" in done.stdout, done.stdout[-4000:]


@interpreter
def test_gpu_layer_checks_hold_on_cpu_interpreted() -> None:
    """The GPU test's checks, tiny and on CPU, so their code stays right where no GPU runs them."""
    _layer_checks("cpu", big=False)


def _layer_checks(device: str = "cuda", big: bool = True, log: Callable[[str], None] = print) -> None:
    """Quantized Linear / Conv2d layers on `device`: the Triton path ("auto" on CUDA) against the torch path."""
    dev = torch.device(device)
    backend = "auto" if dev.type == "cuda" else "triton"
    torch.manual_seed(0)
    linears = [(4096, 4096), (1000, 3001)] if big else [(10, 16), (7, 13)]
    convs = [(64, 128, 3, 1), (96, 96, 3, 96), (3, 32, 3, 1)] if big else [(4, 6, 2, 1), (6, 6, 3, 6), (3, 5, 3, 1)]
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for bits in (1, 2, 3, 4, 8):
        for i, (out_f, in_f) in enumerate(linears):
            dtype = dtypes[(bits + i) % 3]
            layout = list(LAYOUTS)[(bits + i) % len(LAYOUTS)]
            lin = quantize(nn.Linear(in_f, out_f), bits, layout, seed=bits + i).to(dev, dtype)
            xs = [torch.randn(n, in_f, device=dev).to(dtype) for n in (1, 8, FUSED_MAX_TOKENS + 48)]
            with torch.no_grad():
                with kernel_backend("torch"):
                    w = lin.weight
                    large = lin(xs[2])
                with counting_kernels() as calls, kernel_backend(backend):
                    got_w = lin.weight
                    got = [lin(x) for x in xs]
            name = f"linear {out_f}x{in_f} {bits}b {layout} {dtype}"
            assert calls == ["dequant", "fused", "fused", "dequant"], f"{name}: {calls}"
            assert got_w.dtype == dtype and torch.equal(got_w, w), name
            for x, y in zip(xs[:2], got):  # fused: fp32 sums of the exact weight
                want = x.float() @ w.float().T + lin.bias.float()
                err = (y.float() - want).abs()
                assert y.dtype == dtype and (err <= linear_tolerance(x, w, lin.bias)).all(), \
                    f"{name} batch {x.shape[0]}: {err.max()}"
            # dequantize kernel + F.linear: the torch path's F.linear on the same weight (equal but for the BLAS)
            eps = torch.finfo(dtype).eps
            assert torch.allclose(got[2].float(), large.float(), rtol=4 * eps, atol=1e-3), name
        for i, (c_in, c_out, k, groups) in enumerate(convs):
            dtype = dtypes[(bits + i + 1) % 3]
            layout = list(LAYOUTS)[(bits + i + 2) % len(LAYOUTS)]
            conv = quantize(nn.Conv2d(c_in, c_out, k, padding=1, groups=groups), bits, layout, seed=bits).to(dev, dtype)
            x = torch.randn(2, c_in, 12, 12, device=dev).to(dtype)
            with torch.no_grad():
                with kernel_backend("torch"):
                    w, want = conv.weight, conv(x)
                with counting_kernels() as calls, kernel_backend(backend):
                    got = conv(x)
                    got_w = conv.weight
            assert calls == ["dequant", "dequant"], calls
            assert torch.equal(got_w, w), f"conv {c_in}->{c_out} k{k} g{groups} {bits}b {layout} {dtype}"
            tol = 1e-2 if dtype != torch.float32 else 1e-4
            assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol), f"conv {bits}b {layout} {dtype}"
        log(f"ok {bits} bits")
    if dev.type == "cuda":  # the fused kernel never materialises the weight
        lin = quantize(nn.Linear(4096, 4096), 4, seed=9).to(dev, torch.float16)
        x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
        with torch.no_grad(), kernel_backend(backend):
            lin(x)  # first call: kernel arguments cached, kernels compiled
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            lin(x)
            torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 4096 * 4096 * 2 // 16, f"a fused forward allocated {extra} bytes (the dense weight: 32 MiB)"
        log(f"fused 4096x4096 forward allocated {extra} bytes")
    log("all GPU layer checks passed")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run with TRITON_INTERPRET=0 (compiled kernels)"
    assert torch.cuda.is_available(), "needs a CUDA device"
    _layer_checks()
