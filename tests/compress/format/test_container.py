"""Format version 2 (compress/format/container.py): bit-exact round trips of every quantized format with and
without entropy-coded indices, byte-identical rewrites, a small header on a many-layer model, a plain
safetensors reader, the version-1 fixture."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.format.artifact import FORMAT_VERSION, load, read_artifact, read_artifact_parts, write_artifact, write_tensors
from compress.format.breakdown import byte_breakdown, index_coding
from compress.format.restorers import PLAN_FORMAT
from compress.format.weights import encode_codebook, encode_nf4, matrix_shape

ROOT = Path(__file__).resolve().parents[3]
V1 = Path(__file__).parent / "data" / "digits_cls_v1.safetensors"
SPEC = {"build": "compress:digits-cnn", "num_classes": 10, "options": {}}


def skewed_indices(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    """Indices with a geometric distribution (entropy well under `bits`): entropy coding pays."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5 ** (i + 1) for i in range(1 << bits)])
    return torch.multinomial(p, rows * cols, replacement=True, generator=gen).reshape(rows, cols)


def quantized_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    """One weight per quantized format: 1..8 bits, per-group / shared / grid codebooks, row maps none /
    group-ids / order, rows and flat packing, skewed and uniform indices, NF4 with and without double quant."""
    cases = [  # (shape, bits, codebook kind, row_map, skewed)
        ((64, 32), 1, "per-group", "group-ids", True), ((12, 3, 3), 1, "shared", "none", True),
        ((32, 16, 3, 3), 2, "per-group", "group-ids", True), ((96, 1, 3, 3), 2, "per-group", "order", True),
        ((24, 40), 3, "per-group", "group-ids", True), ((7, 9), 3, "grid", "none", True),
        ((16, 32), 4, "shared", "none", True), ((8, 30), 5, "per-group", "order", True),
        ((64, 96), 6, "grid", "none", True), ((32, 100), 7, "per-group", "group-ids", True),
        ((64, 64), 8, "grid", "none", True), ((32, 32), 2, "per-group", "group-ids", False),
        ((16, 16), 8, "per-group", "group-ids", False),
    ]
    tensors, layers = {}, []
    for i, (shape, bits, kind, row_map, skewed) in enumerate(cases):
        rows, cols = matrix_shape(shape)
        gen = torch.Generator().manual_seed(i)
        idx = skewed_indices(rows, cols, bits, i) if skewed else torch.randint(0, 1 << bits, (rows, cols), generator=gen)
        groups_n = rows if row_map == "none" and kind == "grid" else (1 if row_map == "none" else 3)
        order = torch.randperm(rows, generator=gen)
        groups = torch.empty(rows, dtype=torch.long)
        groups[order] = torch.arange(rows) * groups_n // rows
        codebook = None if kind == "grid" else torch.randn(groups_n if kind == "per-group" else 1, 1 << bits, generator=gen)
        scale = torch.rand(groups_n, generator=gen) + 0.5 if kind == "grid" else None
        layout, buffers = encode_codebook(shape, bits, idx, groups, groups_n, codebook, kind=kind, scale=scale,
                                          offset=scale, row_map=row_map, order=order)
        layers.append({"name": f"layer{i}", "attr": "weight", "layout": layout})
        tensors.update({f"layer{i}.weight_{k}": v for k, v in buffers.items()})
        tensors[f"layer{i}.bias"] = torch.randn(rows, generator=gen)
    for j, double in enumerate((False, True)):
        gen = torch.Generator().manual_seed(100 + j)
        weight = torch.randn(64, 128, generator=gen) * (torch.rand(64, 128, generator=gen) < 0.15)  # mostly zeros
        layout, buffers = encode_nf4(weight, 64, double)
        layers.append({"name": f"nf4_{j}", "attr": "weight", "layout": layout})
        tensors.update({f"nf4_{j}.weight_{k}": v for k, v in buffers.items()})
    tensors["bn.running_mean"], tensors["bn.num_batches_tracked"] = torch.randn(5), torch.tensor(7)
    tensors["flag"], tensors["empty"] = torch.tensor([True, False]), torch.zeros(0, 3)
    return tensors, {"model": SPEC, "model_meta": {"quantization": {"format": PLAN_FORMAT, "layers": layers}}}


@pytest.mark.parametrize("coding", [True, False])
def test_every_quantized_format_round_trips_bit_exact(tmp_path: Path, coding: bool) -> None:
    tensors, manifest = quantized_tensors()
    path = tmp_path / "q.safetensors"
    write_tensors(path, tensors, manifest, entropy_coding=coding)
    back, read_manifest, layout = read_artifact_parts(path)
    assert layout["version"] == FORMAT_VERSION == read_manifest["version"] == 2
    assert "index" not in read_manifest and read_manifest["model_meta"] == manifest["model_meta"]
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    coded = {e[0] for e in layout["index"]["tensors"] if len(e) == 5 and e[4]["codec"] == "rans"}
    if not coding:
        assert not coded
        return
    skewed = {f"layer{i}.weight_packed" for i in range(11)} | {"nf4_0.weight_packed", "nf4_1.weight_packed"}
    assert skewed - {"layer1.weight_packed", "layer5.weight_packed"} <= coded, sorted(skewed - coded)  # tiny ones may stay raw
    assert not coded & {"layer11.weight_packed", "layer12.weight_packed"}, "uniform indices do not pay for coding"
    per_bits = index_coding(path)
    assert all(row["stored"] < row["raw"] for row in per_bits.values()), per_bits


def test_entropy_coding_makes_skewed_indices_smaller(tmp_path: Path) -> None:
    tensors, manifest = quantized_tensors()
    sizes = {}
    for coding in (True, False):
        path = tmp_path / f"{coding}.safetensors"
        write_tensors(path, tensors, manifest, entropy_coding=coding)
        sizes[coding] = byte_breakdown(path)
    assert sizes[True]["file"] < sizes[False]["file"]
    assert sizes[True]["indices_coded"] + sizes[True]["indices_raw"] < sizes[False]["indices_raw"]
    for b in sizes.values():
        assert sum(v for k, v in b.items() if k not in ("file", "version")) == b["file"], b


def many_layer_model(blocks: int = 60) -> tuple[nn.Module, dict]:
    """A demo-detector-like model: many small conv + BN blocks, every conv quantized (per-group codebooks,
    packed group ids), so the file has hundreds of small tensors."""
    from compress.format.layers import attach_quantized

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                            for _ in range(blocks)]).eval()
    layers = []
    for i, block in enumerate(model):
        conv = block[0]
        rows, cols = matrix_shape(conv.weight.shape)
        bits = (1, 2, 3)[i % 3]
        idx = skewed_indices(rows, cols, bits, i)
        layout, buffers = encode_codebook(conv.weight.shape, bits, idx, torch.arange(rows) % 3, 3,
                                          torch.randn(3, 1 << bits))
        attach_quantized(conv, layout, buffers)
        layers.append({"name": f"{i}.0", "attr": "weight", "layout": layout})
    return model, {"model": SPEC, "model_meta": {"quantization": {"format": PLAN_FORMAT, "layers": layers}},
                   "task": "detection", "metrics": {"map50": 0.5}}


def test_many_layer_model_has_a_small_header_and_opens_in_plain_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    from compress.format.checkpoint import atomic_save_safetensors, state_tensors

    model, manifest = many_layer_model()
    path = tmp_path / "many.safetensors"
    write_artifact(path, model, manifest)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert 8 + header_len < 8192
    tensors = state_tensors(model)
    assert len(tensors) > 400
    v1_like = tmp_path / "v1-like.safetensors"  # every tensor under its own name, as version 1 stored them
    atomic_save_safetensors(v1_like, tensors, {"format": "compress-artifact/1"})
    (v1_header,) = struct.unpack("<Q", v1_like.read_bytes()[:8])
    assert v1_header > 5 * header_len and path.stat().st_size < v1_like.stat().st_size
    with safe_open(str(path), "pt") as f:  # a plain reader sees two U8 tensors and small string metadata
        assert sorted(f.keys()) == ["manifest", "tensors"]
        assert f.metadata()["format"] == "compress-artifact/2" and len(json.dumps(f.metadata())) < 300
        assert f.get_tensor("tensors").dtype == torch.uint8
    back, _ = read_artifact(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


# ---- what a fresh interpreter does: one process for the three tests below (each start-up costs seconds) ----
# In order: read a plain artifact (constriction must stay unimported), compress.load an artifact with coded streams
# (none of the training stack may come in; constriction does), then write quantized tensors (another process,
# so another hash seed: the bytes must not change). Each step only adds modules, so each check is as strict as in a
# process of its own.
FRESH = """
import json, sys
from compress.format.artifact import read_artifact
read_artifact(sys.argv[1])
plain_constriction = 'constriction' in sys.modules
import torch, compress
model = compress.load(sys.argv[2])
torch.manual_seed(0)
with torch.no_grad():
    y = model(torch.rand(2, 3, 32, 32))
heavy = [n for n in json.loads(sys.argv[3]) if n in sys.modules]
coded_constriction = 'constriction' in sys.modules
from safetensors.torch import load_file
from compress.format.artifact import write_tensors
write_tensors(sys.argv[6], load_file(sys.argv[4]), json.load(open(sys.argv[5])))
print(json.dumps({'plain_constriction': plain_constriction, 'heavy': heavy, 'constriction': coded_constriction,
                  'logits': y.tolist()}))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The inputs of FRESH (a plain artifact, a coded one with its in-memory model, quantized tensors with their
    manifest), its output and the file it wrote."""
    from tests.compress.test_architecture import HEAVY

    from compress.format.checkpoint import atomic_save_safetensors
    from compress.format.layers import attach_quantized
    from compress.models import build_model

    folder = tmp_path_factory.mktemp("fresh")
    plain = folder / "plain.safetensors"
    write_artifact(plain, nn.Sequential(nn.Linear(4, 4)), {"model": SPEC})

    torch.manual_seed(0)
    model = build_model("compress:digits-cnn", num_classes=10).eval()
    conv = model.get_submodule("stage2.conv1.0")
    rows, cols = matrix_shape(conv.weight.shape)
    layout, buffers = encode_codebook(conv.weight.shape, 2, skewed_indices(rows, cols, 2, 0), torch.arange(rows) % 2, 2,
                                      torch.randn(2, 4) * 0.1)
    attach_quantized(conv, layout, buffers)
    coded = folder / "coded.safetensors"
    write_artifact(coded, model, {"model": SPEC, "model_meta": {"quantization": {"format": PLAN_FORMAT, "layers": [
        {"name": "stage2.conv1.0", "attr": "weight", "layout": layout}]}}})

    tensors, manifest = quantized_tensors()
    source = folder / "tensors.safetensors"
    atomic_save_safetensors(source, tensors, {})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    written = folder / "c.safetensors"
    done = subprocess.run([sys.executable, "-c", FRESH, str(plain), str(coded), json.dumps(HEAVY), str(source),
                           str(folder / "manifest.json"), str(written)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    return {"done": done, "result": result, "coded_model": model, "written": written, "tensors": tensors,
            "manifest": manifest}


def test_writing_is_deterministic_across_processes(tmp_path: Path, fresh_process: dict) -> None:
    tensors, manifest = fresh_process["tensors"], fresh_process["manifest"]  # what the other process wrote
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_tensors(first, tensors, manifest)
    write_tensors(second, tensors, manifest)
    assert first.read_bytes() == second.read_bytes()
    done = fresh_process["done"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert fresh_process["written"].read_bytes() == first.read_bytes()


def test_version_1_fixture_loads_and_rewrites_as_version_2(tmp_path: Path) -> None:
    expected = json.loads((V1.parent / "digits_cls_v1_outputs.json").read_text())
    tensors, manifest, layout = read_artifact_parts(V1)
    assert layout["version"] == 1 and manifest["version"] == 1
    assert byte_breakdown(V1)["version"] == 1
    x = (torch.manual_seed(0), torch.rand(2, 3, 32, 32))[1]
    model = load(V1)
    with torch.no_grad():
        assert torch.allclose(model(x), torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    keep = {k: v for k, v in manifest.items() if k not in ("format", "version", "versions", "tensors_sha256",
                                                            "tensor_count")}
    path = tmp_path / "v2.safetensors"
    write_artifact(path, model, keep)
    back, manifest2 = read_artifact(path)
    assert manifest2["version"] == 2 and manifest2["tensors_sha256"] == manifest["tensors_sha256"]
    assert path.stat().st_size < V1.stat().st_size
    with torch.no_grad():
        assert torch.equal(load(path)(x), model(x))


def test_constriction_is_imported_only_for_coded_streams(fresh_process: dict) -> None:
    done = fresh_process["done"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert fresh_process["result"]["plain_constriction"] is False, "constriction imported to read a plain artifact"


def test_loading_a_coded_artifact_stays_lean(fresh_process: dict) -> None:
    """compress.load of a version-2 file with coded streams imports none of the training stack (constriction
    and numpy only)."""
    done = fresh_process["done"]
    assert done.returncode == 0, done.stderr[-2000:]
    result = fresh_process["result"]
    assert result["heavy"] == [] and result["constriction"]
    x = (torch.manual_seed(0), torch.rand(2, 3, 32, 32))[1]
    with torch.no_grad():
        assert torch.equal(torch.tensor(result["logits"]), fresh_process["coded_model"](x))


def test_float32_values_exact_in_float16_take_half_the_bytes(tmp_path: Path) -> None:
    exact = torch.randn(300).half().float()
    tensors = {"a.bias": exact, "b.bias": torch.randn(300), "c.bias": torch.tensor([1e6, 1.0]),
               "d.bias": exact.clone().fill_(float("nan"))}
    path = tmp_path / "f.safetensors"
    write_tensors(path, tensors, {"model": SPEC, "model_meta": {}})
    back, _, layout = read_artifact_parts(path)
    codecs = {e[0]: (e[4]["codec"] if len(e) == 5 else None, e[3]) for e in layout["index"]["tensors"]}
    assert codecs["a.bias"] == ("f16", 600) and codecs["b.bias"] == (None, 1200), codecs
    assert codecs["c.bias"][0] is None and codecs["d.bias"][0] is None, "out of range and NaN stay float32"
    for name, tensor in tensors.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name].nan_to_num(7), tensor.nan_to_num(7)), name


def test_stored_bits_estimates_what_the_container_writes(tmp_path: Path) -> None:
    """weights.stored_bits (what a size budget charges) takes the packed indices at the size the writer stores them:
    the same raw-or-coded choice, a coded stream within 2 % plus its counts, raw entries exact."""
    from compress.format.weights import storage_bits, stored_bits

    tensors, manifest = quantized_tensors()
    path = tmp_path / "q.safetensors"
    write_tensors(path, tensors, manifest)
    index = {entry[0]: entry for entry in read_artifact_parts(path)[2]["index"]["tensors"]}
    coded_any = False
    for layer in manifest["model_meta"]["quantization"]["layers"]:
        key = f"{layer['name']}.{layer['attr']}"
        buffers = {name[len(key) + 1:]: t for name, t in tensors.items() if name.startswith(key + "_")}
        estimate = stored_bits(layer["layout"], buffers) - storage_bits(layer["layout"]) + 8 * buffers["packed"].numel()
        entry = index[key + "_packed"]
        written = 8 * entry[3]
        if len(entry) == 5:  # coded: the stream, plus the counts the manifest holds
            coded_any = True
            counts = 8 * (len(json.dumps(entry[4]["counts"])) // 2)
            assert written <= estimate - counts + 64 and estimate - counts <= 1.02 * written + 64, key
            assert estimate < 8 * buffers["packed"].numel(), key
        else:
            assert estimate == written, key
    assert coded_any
