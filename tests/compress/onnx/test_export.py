"""ONNX export: packed weights stay packed in the graph, and onnxruntime reproduces `compress.load`.

Artifacts are built directly (random codebook indices through `encode_codebook`, random NF4 blocks) rather
than by running a quantizer, so every stored form is covered in a few seconds: 1..8 bits, "rows" and "flat"
packing, per-group / shared / grid codebooks, scales and offsets, group ids and row order, NF4 with and
without double quantization.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import compress
from compress.format.artifact import write_artifact
from compress.models import build_model
from compress.onnx import OnnxExportError, export_module, export_onnx
from compress.onnx.export import FUNCTION_DOMAIN
from compress.onnx.decode import PACKED_GROUP_IDS_MIN_ROWS, decode_traceable, graph_tensors, unpack_traceable
from compress.format.restorers import PLAN_FORMAT
from compress.format.weights import decode, encode_codebook, matrix_shape, row_packing
from compress.format.layers import attach_quantized, quantized_modules
from compress.format.packing import pack_indices, packed_cols, unpack_indices

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# outputs are O(1..10); onnxruntime's conv/gemm sum in another order than torch's: 1e-4 of the output scale
RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# name -> how to store it: (kind, options); cycled over a model's layers
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("codebook", {"bits": 3, "kind": "per-group", "groups": 3, "row_map": "group-ids"}),
    ("codebook", {"bits": 1, "kind": "per-group", "groups": "rows", "row_map": "none"}),
    ("codebook", {"bits": 2, "kind": "shared", "groups": 2, "row_map": "group-ids", "scale": True}),
    ("codebook", {"bits": 4, "kind": "per-group", "groups": 1, "row_map": "none"}),
    ("codebook", {"bits": 8, "kind": "grid", "groups": "rows", "row_map": "none", "scale": True, "offset": True}),
    ("codebook", {"bits": 3, "kind": "per-group", "groups": 4, "row_map": "order"}),
    ("nf4", {"blocksize": 64, "double_quant": False}),
    ("nf4", {"blocksize": 64, "double_quant": True}),
    ("codebook", {"bits": 2, "kind": "per-group", "groups": 3, "row_map": "group-ids", "scale": True, "offset": True}),
    ("codebook", {"bits": 1, "kind": "grid", "groups": 1, "row_map": "none", "scale": True, "offset": True}),
    ("codebook", {"bits": 5, "kind": "shared", "groups": 2, "row_map": "order", "offset": True}),
    ("codebook", {"bits": 6, "kind": "per-group", "groups": 2, "row_map": "group-ids"}),
    ("codebook", {"bits": 7, "kind": "grid", "groups": 1, "row_map": "none", "scale": True}),
    ("codebook", {"bits": 3, "kind": "per-group", "groups": 3, "row_map": "group-ids", "column_scale": True}),
]


def _stored(shape: tuple[int, ...], variant: tuple[str, dict[str, Any]], gen: torch.Generator) -> tuple[dict, dict]:
    """A random stored weight of `shape` in the given form (values of a typical trained layer's scale)."""
    rows, cols = matrix_shape(shape)
    fan_in = cols
    kind, opts = variant
    if kind == "nf4":
        nblocks = -(-rows * cols // opts["blocksize"])
        packing = row_packing(cols, 4)
        idx = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
        packed = pack_indices(idx if packing == "rows" else idx.reshape(1, -1), 4)
        layout = {"format": "nf4", "shape": list(shape), "blocksize": opts["blocksize"],
                  "double_quant": opts["double_quant"], "packing": packing}
        if opts["double_quant"]:
            buffers = {"packed": packed, "absmax": torch.randint(0, 256, (nblocks,), generator=gen, dtype=torch.uint8),
                       "absmax_scale": torch.rand(-(-nblocks // 256), generator=gen) * 0.5 / math.sqrt(fan_in),
                       "absmax_offset": torch.tensor([1.5 / math.sqrt(fan_in)])}
        else:
            buffers = {"packed": packed, "absmax": (torch.rand(nblocks, generator=gen) + 0.5) * 1.5 / math.sqrt(fan_in)}
        return layout, buffers
    bits = opts["bits"]
    groups = rows if opts["groups"] == "rows" else opts["groups"]
    idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    row_group = torch.arange(rows) % groups
    std = 1.0 / math.sqrt(fan_in)
    codebook = scale = offset = None
    if opts["kind"] == "per-group":
        codebook = torch.randn(groups, 1 << bits, generator=gen) * std
    elif opts["kind"] == "shared":
        codebook = torch.randn(1 << bits, generator=gen) * std
    if opts["kind"] == "grid":  # uniform int-b over about [-std, std]
        scale = (torch.rand(groups, generator=gen) + 0.5) * 2.0 * std / (1 << bits)
        offset = -std * torch.ones(groups)
    else:
        scale = torch.rand(groups, generator=gen) + 0.5
        offset = torch.randn(groups, generator=gen) * 0.1 * std
    scale = scale if opts.get("scale") else None
    offset = offset if opts.get("offset") else None
    order = torch.randperm(rows, generator=gen) if opts["row_map"] == "order" else None
    column_scale = torch.rand(cols, generator=gen) + 0.5 if opts.get("column_scale") else None
    return encode_codebook(shape, bits, idx, row_group, groups, codebook, opts["kind"], scale, offset,
                           opts["row_map"], order, column_scale)


def _quantize_randomly(model: nn.Module, seed: int = 0, skip: int = 0) -> dict[str, Any]:
    """Every conv/linear weight becomes a random stored form (VARIANTS in turn); returns the plan."""
    gen = torch.Generator().manual_seed(seed)
    entries = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, (name, module) in enumerate(layers):
        variant = VARIANTS[(i + skip) % len(VARIANTS)]
        layout, buffers = _stored(tuple(module.weight.shape), variant, gen)
        attach_quantized(module, layout, buffers)
        entries.append({"name": name, "attr": "weight", "layout": layout})
    plan = {"format": PLAN_FORMAT, "layers": entries}
    model.quantization_plan = plan
    return plan


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)


def _make_artifact(path: Path, build: str, options: dict[str, Any], task: str, image_size: int,
                   num_classes: int = 10, skip: int = 0) -> Path:
    torch.manual_seed(0)
    model = build_model(build, num_classes=num_classes, **options).eval()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    plan = _quantize_randomly(model, skip=skip)
    write_artifact(path, model, {"model": {"build": build, "num_classes": num_classes, "options": options},
                                 "model_meta": {"quantization": plan}, "task": task, "image_size": image_size})
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-cnn with odd widths (so short rows are packed "flat"), every stored form in some layer."""
    path = tmp_path_factory.mktemp("onnx") / "cnn.safetensors"
    return _make_artifact(path, "compress:digits-cnn", {"widths": [24, 38, 56]}, "classification", 16)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """compress:yolo-n (59 layers, three output maps) at 32x32, stored forms cycled from another start."""
    path = tmp_path_factory.mktemp("onnx") / "yolo.safetensors"
    return _make_artifact(path, "compress:yolo-n", {}, "detection", 32, num_classes=3, skip=5)


def _ops(proto: Any) -> set[str]:
    """The op types of the graph and of its functions' bodies."""
    return {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


def _run(onnx_path: str | Path, x: torch.Tensor) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})


def _reference(artifact: Path, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = compress.load(artifact)(x)
    return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


def _assert_close(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    assert len(got) == len(expected)
    worst = 0.0
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= RTOL * scale, f"max abs difference {err} > {RTOL} x {scale}"
        worst = max(worst, err)
    return worst


# --- the traceable decoder equals formats.decode, bit for bit -----------------------------------------------

@pytest.mark.parametrize("bitops", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_matches_packing(bits: int, bitops: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    for rows, cols in [(3, 1), (2, 7), (4, 27), (1, 64)]:
        idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
        packed = pack_indices(idx, bits)
        assert packed.shape[1] == packed_cols(cols, bits)
        got = unpack_traceable(packed, bits, rows, cols, bitops)
        assert got.dtype == torch.int64 and torch.equal(got, unpack_indices(packed, bits, cols).long())


@pytest.mark.parametrize("bitops", [True, False])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-" + "-".join(f"{k}={w}" for k, w in v[1].items()))
def test_traceable_decode_is_exact(variant: tuple[str, dict[str, Any]], bitops: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(12, 6, 3, 3), (7, 5), (40, 3, 3, 3), (PACKED_GROUP_IDS_MIN_ROWS + 3, 5)]:  # the last: ids packed
        layout, buffers = _stored(shape, variant, gen)
        tensors = graph_tensors(layout, buffers)
        if layout.get("row_map") == "group-ids":
            assert ("group_ids" in tensors) == (shape[0] >= PACKED_GROUP_IDS_MIN_ROWS)
        assert torch.equal(decode_traceable(layout, tensors, bitops), decode(layout, buffers))


# --- export + onnxruntime ---------------------------------------------------------------------------------

def test_packed_export_keeps_weights_packed_and_matches_load(classifier: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn.onnx"
    info = export_onnx(classifier, out)
    assert info["path"] == str(out) and info["bytes"] == out.stat().st_size
    assert info["artifact_bytes"] == classifier.stat().st_size and info["dense"] is False
    assert info["ratio"] == pytest.approx(info["bytes"] / info["artifact_bytes"], abs=1e-4)
    assert info["ratio"] <= 1.3, info
    assert info["opset"] == 18 and info["outputs"] == ["output"] and info["quantized_layers"] == 11

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t for t in proto.graph.initializer}
    layers = quantized_modules(compress.load(classifier))
    # one call of a model-local decode function per quantized layer, fed by its stored tensors
    calls = [n for n in proto.graph.node if n.domain == FUNCTION_DOMAIN]
    assert len(calls) == len(layers)
    stored = [inits[name] for n in calls for name in n.input if name in inits]
    assert all(t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT16,
                               onnx.TensorProto.FLOAT) for t in stored)
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in stored) >= 8  # codebooks, scales, offsets
    stored_bytes = sum(v.numel() * v.element_size() for m in layers.values() for v in m.quant_buffers().values())
    # nothing unpacked but the group ids of small layers, one byte per row (the int16 row order shrinks)
    row_bytes = sum(matrix_shape(m.quant_layout["shape"])[0] for m in layers.values()
                    if m.quant_layout.get("row_map") == "group-ids")
    assert sum(len(t.raw_data) for t in stored) <= stored_bytes + row_bytes
    # 32-bit floats in the graph: BN parameters, biases, NF4 absmax, ... never a decoded weight
    floats = sum(math.prod(t.dims) for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT)
    assert floats < sum(math.prod(m.quant_layout["shape"]) for m in layers.values()) / 4
    assert {"BitShift", "BitwiseAnd", "GatherElements", "Gather"} <= _ops(proto), _ops(proto)

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # batch 3: the batch axis is dynamic
    _assert_close(_run(out, x), _reference(classifier, x))


def test_dense_export_is_bigger_and_matches_load(classifier: Path, tmp_path: Path) -> None:
    packed = export_onnx(classifier, tmp_path / "packed.onnx")
    dense = export_onnx(classifier, tmp_path / "dense.onnx", dense=True)
    assert dense["dense"] is True and dense["quantized_layers"] == 0
    assert dense["bytes"] > 2 * packed["bytes"], (dense, packed)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _assert_close(_run(tmp_path / "dense.onnx", x), _reference(classifier, x))


def test_older_opset_decodes_with_integer_arithmetic(classifier: Path, tmp_path: Path) -> None:
    out = tmp_path / "op13.onnx"
    info = export_onnx(classifier, out, opset=13)
    proto = onnx.load(str(out))
    assert info["opset"] == 13 and proto.opset_import[0].version == 13
    ops = _ops(proto)
    assert "BitwiseAnd" not in ops and {"Div", "Mod"} <= ops, ops
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    _assert_close(_run(out, x), _reference(classifier, x))


def test_detector_exports_every_output_map(detector: Path, tmp_path: Path) -> None:
    out = tmp_path / "yolo.onnx"
    info = export_onnx(detector, out)
    assert info["outputs"] == ["output0", "output1", "output2"]
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    # 59 quantized layers in the 13 stored forms of VARIANTS: one decode function per form, one call per layer
    assert sum(n.domain == FUNCTION_DOMAIN for n in proto.graph.node) == 59
    decoders = [f for f in proto.functions if f.name.startswith("d")]
    assert len(decoders) <= len(VARIANTS), [f.name for f in decoders]
    assert meta["task"] == "detection" and meta["strides"] == "8,16,32" and meta["compress_form"] == "packed"
    # onnxruntime folds the decoding at session creation (and still fuses every BatchNormalization into its
    # Conv, also inside layer functions): the optimized graph is the dense model's
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not optimized & {"BitShift", "BitwiseAnd", "GatherElements", "BatchNormalization"}, optimized
    assert any(f.name.startswith("l") for f in proto.functions)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got = _run(out, x)
    assert [g.shape for g in got] == [(2, 7, 4, 4), (2, 7, 2, 2), (2, 7, 1, 1)]
    _assert_close(got, _reference(detector, x))


# --- errors ----------------------------------------------------------------------------------------------

def test_bad_opset_and_missing_onnx(classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for opset in (9, 21, "18"):
        with pytest.raises(OnnxExportError, match="opset"):
            export_onnx(classifier, tmp_path / "x.onnx", opset=opset)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(OnnxExportError, match=r"pip install 'compress\[onnx\]'"):
        export_onnx(classifier, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_layer_that_cannot_be_exported_is_named(classifier: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.onnx.export as export_module

    real = export_module.decode_traceable

    def broken(layout: dict, tensors: dict, bitops: bool = True) -> torch.Tensor:
        if layout.get("row_map") == "order":
            raise NotImplementedError("no row order")
        return real(layout, tensors, bitops)

    monkeypatch.setattr(export_module, "decode_traceable", broken)
    with pytest.raises(OnnxExportError, match=r"layer 'stage2\.conv1\.0' \(codebook 3-bit .*no row order"):
        export_onnx(classifier, tmp_path / "x.onnx")
    monkeypatch.setattr(export_module, "decode_traceable",
                        lambda layout, tensors, bitops=True: real(layout, tensors, bitops) + 1)
    with pytest.raises(OnnxExportError, match=r"layer 'stem\.0' .*does not reproduce the stored weight"):
        export_onnx(classifier, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir()), "no file (nor temporary file) is left behind on failure"


def test_an_exporter_failure_names_the_module(classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    import compress.onnx.export as export_module_

    real = export_module_.decode_traceable

    def unsupported(layout: dict, tensors: dict, bitops: bool = True) -> torch.Tensor:
        w = real(layout, tensors, bitops)
        if torch.jit.is_tracing() and layout.get("bits") == 1:
            p = tensors["packed"] * 2
            w = w + ((p | p).sum() * 0).float()  # integer BitwiseOr: no TorchScript symbolic
        return w

    monkeypatch.setattr(export_module_, "decode_traceable", unsupported)
    with pytest.raises(OnnxExportError, match=r"export failed in module 'stage1\.down\.0' .*bitwise OR") as info:
        export_onnx(classifier, tmp_path / "x.onnx")
    assert len(str(info.value)) < 1000, "the exporter's message holds the whole graph; ours is one line"
    assert len(capfd.readouterr().out) < 1000, "the exporter's graph dump is not printed"
    assert not list(tmp_path.iterdir())


class _Attention(nn.Module):
    """Patch embedding, nn.MultiheadAttention (quantized in_proj_weight and out_proj), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        y, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head(y.mean(1))


def test_export_module_with_quantized_attention(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Attention().eval()
    gen = torch.Generator().manual_seed(0)
    sites = [(model.embed, "weight"), (model.attn, "in_proj_weight"), (model.attn.out_proj, "weight"),
             (model.head, "weight")]
    for i, (module, attr) in enumerate(sites):
        layout, buffers = _stored(tuple(getattr(module, attr).shape), VARIANTS[i], gen)
        attach_quantized(module, layout, buffers, attr)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        expected = model(x).numpy()
    info = export_module(model, x[:1], tmp_path / "attn.onnx")
    assert info["quantized_layers"] == 4 and info["outputs"] == ["output"]
    _assert_close(_run(tmp_path / "attn.onnx", x), [expected])


class _FoldedBlocks(nn.Module):
    """Convs with biases and SiLU (BatchNorm folded into the convs), in several geometries, and a plain
    conv head: the layers that the export folds into layer functions."""

    def __init__(self) -> None:
        super().__init__()
        def block(cin: int, cout: int, k: int, **kw: Any) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, **kw), nn.SiLU())
        self.blocks = nn.Sequential(block(3, 8, 3, padding=1), block(8, 16, 3, stride=2, padding=1),
                                    block(16, 16, 1), block(16, 16, 3, padding=2, dilation=2, groups=4),
                                    block(16, 24, 3, stride=2, padding=1), block(24, 24, 1))
        self.extra = nn.Conv2d(24, 24, 1, bias=False)  # no bias, no activation
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.extra(self.blocks(x))))


@pytest.mark.parametrize("opset, packed_ids", [(18, False), (17, False), (18, True)])
def test_folded_conv_blocks_become_layer_functions(tmp_path: Path, opset: int, packed_ids: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if packed_ids:  # every layer's group ids stay packed and are unpacked by the graph
        monkeypatch.setattr("compress.onnx.decode.PACKED_GROUP_IDS_MIN_ROWS", 1)
    torch.manual_seed(0)
    model = _FoldedBlocks().eval()
    gen = torch.Generator().manual_seed(0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        with torch.no_grad():
            if conv.bias is not None:  # fp16 values, as an artifact that stores biases in fp16 loads them
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen).mul(0.1).half().float())
        variant = VARIANTS[0] if i < 5 else VARIANTS[8]  # 3-bit group ids; 2-bit with scale and offset
        layout, buffers = _stored(tuple(conv.weight.shape), variant, gen)
        attach_quantized(conv, layout, buffers)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        expected = model(x).numpy()
    info = export_module(model, x[:1], tmp_path / "blocks.onnx", opset=opset)
    assert info["quantized_layers"] == 8
    proto = onnx.load(str(tmp_path / "blocks.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    calls = [n for n in proto.graph.node if n.domain == FUNCTION_DOMAIN]
    assert len(calls) == 8
    layer_calls = [n for n in calls if n.op_type.startswith("l")]
    assert len(layer_calls) == 5, [n.op_type for n in calls]  # the first five: one decoder, SiLU after
    assert not any(n.op_type in ("Sigmoid", "Conv") for n in proto.graph.node if n.output[0] in
                   {o for c in layer_calls for o in c.output})
    group_ids = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2
                 and t.dims[0] == 1 and t.dims[1] <= 6]  # [1, ceil(rows * 2 / 8)]: 3 groups, 2-bit ids
    assert bool(group_ids) == packed_ids
    # the fp16 biases are stored in fp16 (one vector, cast and split in the graph)
    assert not any(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer)
    _assert_close(_run(tmp_path / "blocks.onnx", x), [expected])
