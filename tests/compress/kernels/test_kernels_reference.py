"""The torch references and the dispatcher's torch path: definitions, layouts, argument checks, lazy triton."""
from __future__ import annotations

import pytest
import torch

from compress.kernels import codebook_kernel_args, dequantize, dequantize_ref, gemv_ref, quantized_linear, unpack_ref
from compress.kernels.reference import bit_planes, packed_cols
from compress.kernels.torch_dequant import dequantize_torch
from compress.format import packing, weights as formats


def test_import_compress_kernels_does_not_import_triton(fresh_interpreter: dict) -> None:
    # `import compress, compress.kernels` and its dispatchers in a fresh interpreter (shared:
    # tests/compress/fresh_interpreter.py)
    assert fresh_interpreter["returncode"] == 0, fresh_interpreter["stderr"][-2000:]
    assert fresh_interpreter["result"]["kernels_triton"] is False, "triton imported"


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_packing(bits: int) -> None:
    assert bit_planes(bits) == packing.bit_planes(bits)
    for cols in (1, 7, 8, 9, 37, 64):
        assert packed_cols(cols, bits) == packing.packed_cols(cols, bits)
        idx = torch.randint(0, 1 << bits, (3, cols))
        got = unpack_ref(packing.pack_indices(idx, bits), bits, cols)
        assert torch.equal(got, idx), f"unpack_ref disagrees with pack_indices at {bits} bits, {cols} cols"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_mode", ["shared", "even", "group_size", "per_row", "tensor"])
def test_dequantize_ref_matches_naive_definition(quantized, naive, bits: int, group_mode: str) -> None:
    args, idx = quantized(7, 13, bits, group_mode, num_groups=3, row_order=bits % 2 == 1, seed=bits)
    want = naive(args, idx)
    got = dequantize_ref(**args, dtype=torch.float32)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max()}"
    # the same through packing.unpack_indices
    assert torch.equal(packing.unpack_indices(args["packed"], bits, 13).long(), idx)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_mode", ["shared", "even", "group_size", "per_row", "tensor"])
def test_table_driven_cpu_path_matches_reference(quantized, bits: int, group_mode: str) -> None:
    for i, (rows, cols) in enumerate([(1, 1), (6, 13), (17, 40)]):
        dtype = (torch.float16, torch.bfloat16, torch.float32)[(i + bits) % 3]
        args, _ = quantized(rows, cols, bits, group_mode, row_order=bool((i + bits) % 2), seed=i,
                            codebook_dtype=torch.float32 if i == 2 else torch.float16)
        got, want = dequantize_torch(**args, dtype=dtype), dequantize_ref(**args, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, want), f"{rows}x{cols} {dtype}"


def test_cpu_path_falls_back_to_reference_for_large_tables(quantized, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.kernels import torch_dequant

    monkeypatch.setattr(torch_dequant, "_MAX_TABLE", 0)
    args, _ = quantized(9, 30, 3, "tensor", row_order=True)
    assert torch.equal(dequantize_torch(**args), dequantize_ref(**args))


def test_dequantize_ref_rounds_once_to_dtype(quantized) -> None:
    args, _ = quantized(6, 10, 4, "even", codebook_dtype=torch.float32)
    w32 = dequantize_ref(**args, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_ref(**args, dtype=dtype), w32.to(dtype))


def test_row_order_places_stored_rows(quantized) -> None:
    args, _ = quantized(5, 9, 2, "per_row", row_order=True)
    plain = dequantize_ref(**{**args, "row_order": None}, dtype=torch.float32)
    placed = dequantize_ref(**args, dtype=torch.float32)
    order = args["row_order"].long()
    assert torch.equal(placed[order], plain), "stored row r must land at output row row_order[r]"


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_gemv_ref_and_torch_dispatch(quantized, tolerance, lead: tuple[int, ...]) -> None:
    args, _ = quantized(11, 21, 3, "even", row_order=True)
    x = torch.randn(*lead, 21)
    bias = torch.randn(11)
    w = dequantize_ref(**args, dtype=torch.float32)
    want = torch.nn.functional.linear(x, w, bias)
    assert torch.allclose(gemv_ref(x, **args, bias=bias), want, atol=1e-5)
    got = quantized_linear(x, **args, bias=bias, backend="torch")
    assert got.shape == (*lead, 11)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(dequantize(**args, dtype=torch.float32), w), "auto on CPU must take the torch path"


def test_quantized_linear_keeps_the_gradient_of_x(quantized) -> None:
    args, _ = quantized(4, 8, 2)
    x = torch.randn(2, 8, requires_grad=True)
    quantized_linear(x, **args).sum().backward()
    w = dequantize_ref(**args, dtype=torch.float32)
    assert torch.allclose(x.grad, w.sum(0).expand(2, 8))


@pytest.mark.parametrize("change, message", [
    ({"bits": 9}, "bits must be"),
    ({"cols": 13}, "packed rows hold"),
    ({"codebooks": torch.zeros(2, 3)}, "codebooks must be float"),
    ({"groups": torch.zeros(6, dtype=torch.int32), "group_size": 2}, "not both"),
    ({"groups": torch.zeros(5)}, "groups must be an int tensor"),
    ({"group_size": 1}, "cuts 6 rows into 6 groups"),
    ({"row_order": torch.arange(5)}, "row_order must be an int tensor"),
])
def test_bad_arguments_say_what_is_wrong(quantized, change: dict, message: str) -> None:
    args, _ = quantized(6, 10, 2, "even", num_groups=2)
    with pytest.raises(ValueError, match=message):
        dequantize_ref(**{**args, **change})


def test_unknown_backend_lists_the_known_ones(quantized) -> None:
    args, _ = quantized(2, 8, 1)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, torch, triton"):
        dequantize(**args, backend="cuda")


def _layouts() -> list[tuple[str, dict]]:
    return [("per-group, group-ids", {"kind": "per-group", "row_map": "group-ids"}),
            ("per-group, order", {"kind": "per-group", "row_map": "order"}),
            ("per-group, one per row", {"kind": "per-group", "row_map": "none", "per_row": True}),
            ("per-group + scale + offset",
             {"kind": "per-group", "row_map": "group-ids", "scale": True, "offset": True}),
            ("shared + scale", {"kind": "shared", "row_map": "group-ids", "scale": True}),
            ("shared, one group", {"kind": "shared", "row_map": "none", "one_group": True}),
            ("grid + scale + offset (int-b)", {"kind": "grid", "row_map": "order", "scale": True, "offset": True})]


def encode(rows: int, cols: int, bits: int, spec: dict, seed: int = 0) -> tuple[dict, dict]:
    """A formats.encode_codebook layout + buffers of a random weight (conv-shaped: [rows, cols // 3, 3])."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = rows if spec.get("per_row") else 1 if spec.get("one_group") else 3
    idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    order = torch.randperm(rows, generator=gen)
    if spec["row_map"] == "order":  # position p of the order is in group floor(p * G / rows)
        groups = torch.empty(rows, dtype=torch.long)
        groups[order] = torch.arange(rows) * num_groups // rows
    else:
        groups = torch.randint(0, num_groups, (rows,), generator=gen) if num_groups not in (1, rows) \
            else torch.arange(rows) % num_groups
    codebook = None if spec["kind"] == "grid" else \
        torch.randn(num_groups if spec["kind"] == "per-group" else 1, 1 << bits, generator=gen)
    scale = torch.rand(num_groups, generator=gen) + 0.5 if spec.get("scale") else None
    offset = torch.randn(num_groups, generator=gen) if spec.get("offset") else None
    return formats.encode_codebook([rows, cols // 3, 3], bits, idx, groups, num_groups, codebook, spec["kind"],
                                   scale, offset, spec["row_map"], order)


@pytest.mark.parametrize("name, spec", _layouts(), ids=[n for n, _ in _layouts()])
@pytest.mark.parametrize("bits", [2, 3])
def test_codebook_kernel_args_decode_like_formats(name: str, spec: dict, bits: int) -> None:
    layout, buffers = encode(12, 15, bits, spec)
    args = codebook_kernel_args(layout, buffers)
    want = formats.decode(layout, buffers).reshape(12, 15)
    assert torch.equal(dequantize(**args, dtype=torch.float32, backend="torch"), want), name
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize(**args, dtype=dtype, backend="torch"), want.to(dtype)), f"{name} {dtype}"


def test_codebook_kernel_args_refuses_nf4() -> None:
    with pytest.raises(ValueError, match="no kernel for the 'nf4' format"):
        codebook_kernel_args({"format": "nf4", "shape": [2, 64], "blocksize": 64, "double_quant": False}, {})


@pytest.fixture
def clean_backend(monkeypatch: pytest.MonkeyPatch):
    from compress.kernels import dispatch

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.delenv(dispatch.FORCE_TRITON_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_BACKEND", None)
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: True)  # as on a CUDA box
    return dispatch


def test_backend_setting_precedence(clean_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch = clean_backend
    assert dispatch.configured_backend() == "auto"
    assert dispatch.use_triton("cuda") and not dispatch.use_triton("cpu"), "auto: Triton on CUDA tensors only"
    monkeypatch.setenv(dispatch.FORCE_TRITON_ENV, "1")
    assert dispatch.use_triton("cpu"), "COMPRESS_FORCE_TRITON=1 still forces auto to Triton"
    monkeypatch.setenv(dispatch.KERNELS_ENV, " Torch ")
    assert dispatch.configured_backend() == "torch" and not dispatch.use_triton("cuda")
    monkeypatch.setenv(dispatch.KERNELS_ENV, "triton")
    assert dispatch.use_triton("cpu")
    with dispatch.kernel_backend("torch"):  # the process-wide setting beats the environment
        assert dispatch.configured_backend() == "torch" and not dispatch.use_triton("cuda")
        assert dispatch.use_triton("cpu", backend="triton"), "a call's explicit backend beats both"
        with dispatch.kernel_backend(None):
            assert dispatch.configured_backend() == "triton"
    assert dispatch.configured_backend() == "triton"
    dispatch.set_backend("auto")
    assert dispatch.configured_backend() == "auto"
    dispatch.set_backend(None)
    assert dispatch.configured_backend() == "triton"


def test_bad_backend_settings_say_what_is_wrong(clean_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch = clean_backend
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        dispatch.set_backend("gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with dispatch.kernel_backend("gpu"):
            pass
    monkeypatch.setenv(dispatch.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="COMPRESS_KERNELS='cuda' is not a kernel backend.*auto, torch, triton"):
        dispatch.use_triton("cpu")


def test_torch_setting_is_honoured_by_the_calls(clean_backend, quantized, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend torch set process-wide wins over COMPRESS_FORCE_TRITON; "triton" sends CPU tensors to the kernels."""
    dispatch = clean_backend
    monkeypatch.setenv(dispatch.FORCE_TRITON_ENV, "1")
    asked: list[str] = []

    def no_triton(name: str, device: torch.device) -> None:
        asked.append(name)
        raise RuntimeError("stop")

    monkeypatch.setattr(dispatch, "_kernels", no_triton)
    args, _ = quantized(4, 8, 2)
    with dispatch.kernel_backend("torch"):
        assert torch.equal(dequantize(**args), dequantize_ref(**args))
        assert quantized_linear(torch.randn(1, 8), **args).shape == (1, 4)
    assert asked == []
    with dispatch.kernel_backend("triton"), pytest.raises(RuntimeError, match="stop"):
        quantized_linear(torch.randn(1, 8), **args)
    assert asked == ["triton_gemv"]
