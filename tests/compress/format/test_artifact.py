import copy
import json
import random
import struct
from pathlib import Path

import pytest
import torch

import compress
from compress.format.artifact import FORMAT_VERSION, ArtifactError, load, read_artifact, write_artifact
from compress.models import build_model

SPEC = {"build": "compress:digits-cnn", "num_classes": 10, "options": {}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("compress:digits-cnn", num_classes=10).eval()
    path = tmp_path_factory.mktemp("artifact") / "model.safetensors"
    write_artifact(path, model, {"model": SPEC, "model_meta": {}, "task": "classification", "metrics": {"top1": 0.5}})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return path, x, model(x)


def test_round_trip_gives_the_same_outputs(artifact) -> None:
    path, x, expected = artifact
    with torch.no_grad():
        assert torch.equal(compress.load(path)(x), expected)
    _, manifest = read_artifact(path)
    assert manifest["version"] == FORMAT_VERSION and manifest["metrics"] == {"top1": 0.5}
    assert set(manifest["versions"]) >= {"torch", "compress", "safetensors"}


def _expect_error_or_same_model(path: Path, x: torch.Tensor, expected: torch.Tensor, case: str) -> str:
    """A damaged file must raise ArtifactError, or (harmless damage, e.g. JSON whitespace) load the same model."""
    try:
        model = load(path)
    except ArtifactError as exc:
        assert str(path) in str(exc), f"{case}: message must name the file: {exc}"
        return "error"
    with torch.no_grad():
        assert torch.equal(model(x), expected), f"{case}: loaded a different model without an error"
    return "same"


def test_fuzz_damaged_files_raise_artifact_error(artifact, tmp_path: Path) -> None:
    path, x, expected = artifact
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(0)
    cases: dict[str, bytes] = {"empty": b"", "seven bytes": raw[:7], "header only": raw[: 8 + header_len],
                               "absurd header length": struct.pack("<Q", 2**62) + raw[8:],
                               "header longer than file": struct.pack("<Q", len(raw)) + raw[8:],
                               "trailing bytes": raw + b"\0" * 16, "not json": raw[:8] + b"\xff" * header_len + raw[8 + header_len:]}
    for cut in sorted(rng.sample(range(1, len(raw)), 12)):
        cases[f"truncated at {cut}"] = raw[:cut]
    for i in range(60):
        where = rng.randrange(8, 8 + header_len) if i % 2 else rng.randrange(8 + header_len, len(raw))
        damaged = bytearray(raw)
        damaged[where] ^= 1 << rng.randrange(8)
        cases[f"bit flip at {where} ({'header' if i % 2 else 'data'})"] = bytes(damaged)
    outcomes = {}
    for case, data in cases.items():
        target = tmp_path / "damaged.safetensors"
        target.write_bytes(data)
        outcomes[case] = _expect_error_or_same_model(target, x, expected, case)
    data_flips = [c for c in outcomes if c.endswith("(data)")]
    assert all(outcomes[c] == "error" for c in data_flips), "every flipped data byte must be caught by the checksum"
    assert sum(v == "error" for v in outcomes.values()) >= len(outcomes) - 5, outcomes


def _rewrite_metadata(path: Path, out: Path, change) -> None:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + header_len])
    change(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * ((-len(new)) % 8)
    out.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + header_len:])


def test_unknown_version_and_foreign_files(artifact, tmp_path: Path) -> None:
    path = artifact[0]
    future = tmp_path / "future.safetensors"
    _rewrite_metadata(path, future, lambda m: m.update(format="compress-artifact/99"))
    with pytest.raises(ArtifactError, match="format version '99' is not supported"):
        load(future)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(ArtifactError, match="not a compress artifact"):
        load(foreign)
    with pytest.raises(ArtifactError, match="file not found"):
        load(tmp_path / "missing.safetensors")


def test_manifest_that_does_not_match_tensors(tmp_path: Path) -> None:
    model = build_model("compress:digits-cnn", num_classes=10)
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, {"model": {**SPEC, "num_classes": 7}, "model_meta": {}, "task": "classification"})
    with pytest.raises(ArtifactError, match="does not match the tensors.*head.weight"):
        load(path)
    write_artifact(path, model, {"model": {**SPEC, "build": "compress:nope"}, "model_meta": {}})
    with pytest.raises(ArtifactError, match="does not describe a buildable model"):
        load(path)


def test_import_compress_does_not_import_triton(fresh_interpreter: dict) -> None:
    # `import compress, compress.format.artifact` in a fresh interpreter (shared: tests/compress/fresh_interpreter.py)
    assert fresh_interpreter["returncode"] == 0, fresh_interpreter["stderr"][-2000:]
    assert fresh_interpreter["result"]["artifact_triton"] is False, "triton imported"


# ---- format version 2: the container's own fields (manifest tensor, index, entropy-coded streams) ----------

@pytest.fixture(scope="module")
def coded_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """digits-cnn with three layers quantized from skewed indices, so the file holds entropy-coded streams."""
    from compress.format.layers import attach_quantized
    from compress.format.restorers import PLAN_FORMAT
    from compress.format.weights import encode_codebook, matrix_shape

    torch.manual_seed(0)
    model = build_model("compress:digits-cnn", num_classes=10).eval()
    layers = []
    for i, (name, bits) in enumerate((("stage2.conv1.0", 2), ("stage3.conv2.0", 3), ("stage2.conv2.0", 1))):
        module = model.get_submodule(name)
        rows, cols = matrix_shape(module.weight.shape)
        gen = torch.Generator().manual_seed(i)
        p = torch.tensor([0.5 ** (k + 1) for k in range(1 << bits)])
        idx = torch.multinomial(p, rows * cols, replacement=True, generator=gen).reshape(rows, cols)
        layout, buffers = encode_codebook(module.weight.shape, bits, idx, torch.arange(rows) % 3, 3,
                                          torch.randn(3, 1 << bits, generator=gen) * 0.1)
        attach_quantized(module, layout, buffers)
        layers.append({"name": name, "attr": "weight", "layout": layout})
    path = tmp_path_factory.mktemp("coded") / "model.safetensors"
    write_artifact(path, model, {"model": SPEC, "model_meta": {"quantization": {"format": PLAN_FORMAT, "layers": layers}},
                                 "task": "classification"})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return path, x, model(x)


def _container_parts(path: Path) -> tuple[dict, dict, bytes, int]:
    """(safetensors header, stored manifest with its index, data blob, data section offset) of a v2 file."""
    import zlib

    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + header_len])
    start = 8 + header_len
    span = lambda name: raw[start + header[name]["data_offsets"][0]: start + header[name]["data_offsets"][1]]  # noqa: E731
    return header, json.loads(zlib.decompress(span("manifest"))), span("tensors"), start


def _write_container(out: Path, stored_manifest: dict, data: bytes, metadata_change=None) -> None:
    """A v2 file around `stored_manifest` (index included) and `data`, with a valid manifest checksum."""
    import hashlib
    import zlib

    from compress.format.checkpoint import atomic_save_safetensors

    text = json.dumps(stored_manifest, sort_keys=True, separators=(",", ":")).encode()
    metadata = {"format": "compress-artifact/2", "manifest_encoding": "zlib",
                "manifest_sha256": hashlib.sha256(text).hexdigest()}
    if metadata_change:
        metadata_change(metadata)
    atomic_save_safetensors(out, {"tensors": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                  "manifest": torch.frombuffer(bytearray(zlib.compress(text, 9)), dtype=torch.uint8)},
                            metadata)


def test_v2_artifact_loads_and_holds_coded_streams(coded_artifact) -> None:
    path, x, expected = coded_artifact
    _, stored, _, _ = _container_parts(path)
    assert sum(len(e) == 5 and e[4]["codec"] == "rans" for e in stored["index"]["tensors"]) == 3
    with torch.no_grad():
        assert torch.equal(load(path)(x), expected)


def test_fuzz_v2_manifest_index_and_coded_streams(coded_artifact, tmp_path: Path) -> None:
    """Bit flips and cuts in the compressed manifest, the index and the coded streams, and forged index entries
    (valid manifest checksum around a wrong index): every damaged file raises an ArtifactError naming it."""
    path, x, expected = coded_artifact
    raw = path.read_bytes()
    header, stored, data, start = _container_parts(path)
    rng = random.Random(1)
    cases: dict[str, bytes | tuple] = {}
    m0, m1 = (start + o for o in header["manifest"]["data_offsets"])
    d0 = start + header["tensors"]["data_offsets"][0]
    regions = {"manifest": (m0, m1)}
    offset = 0
    for entry in stored["index"]["tensors"]:
        if len(entry) == 5 and entry[4]["codec"] == "rans":
            regions[f"stream {entry[0]}"] = (d0 + offset, d0 + offset + entry[3])
        offset += entry[3]
    for region, (begin, end) in regions.items():
        for _ in range(25 if region == "manifest" else 10):
            where = rng.randrange(begin, end)
            damaged = bytearray(raw)
            damaged[where] ^= 1 << rng.randrange(8)
            cases[f"bit flip in {region} at {where}"] = bytes(damaged)
        for cut in (begin + 1, (begin + end) // 2, end - 1):
            cases[f"{region} cut at {cut}"] = raw[:cut]
        cases[f"{region} zeroed"] = raw[:begin] + bytes(end - begin) + raw[end:]

    coded = [i for i, e in enumerate(stored["index"]["tensors"]) if len(e) == 5 and e[4]["codec"] == "rans"]
    first, raw_entry = coded[0], next(i for i, e in enumerate(stored["index"]["tensors"]) if len(e) == 4)

    def forge(change, metadata_change=None, blob=data):
        def make(out: Path) -> None:
            manifest = json.loads(json.dumps(stored))
            change(manifest, manifest["index"]["tensors"])
            _write_container(out, manifest, blob, metadata_change)
        return make

    def set_codec(key, value):
        return lambda m, t: t[first][4].__setitem__(key, value)

    forged = {
        "index missing": lambda m, t: m.pop("index"),
        "index version 2": lambda m, t: m["index"].__setitem__("version", 2),
        "index tensors not a list": lambda m, t: m["index"].__setitem__("tensors", {"a": 1}),
        "entry of three fields": lambda m, t: t.__setitem__(0, t[0][:3]),
        "entry not a list": lambda m, t: t.__setitem__(0, "x"),
        "name repeated": lambda m, t: t[1].__setitem__(0, t[0][0]),
        "name not a string": lambda m, t: t[0].__setitem__(0, 7),
        "dtype unknown": lambda m, t: t[raw_entry].__setitem__(1, "F8"),
        "dtype changed": lambda m, t: t[raw_entry].__setitem__(1, "I32" if t[raw_entry][1] != "I32" else "F32"),
        "shape negative": lambda m, t: t[raw_entry].__setitem__(2, [-1]),
        "shape of nine dims": lambda m, t: t[raw_entry].__setitem__(2, [1] * 9),
        "shape huge": lambda m, t: t[raw_entry].__setitem__(2, [1 << 28, 1 << 28]),
        "shape not a list": lambda m, t: t[raw_entry].__setitem__(2, "3"),
        "length plus one": lambda m, t: t[raw_entry].__setitem__(3, t[raw_entry][3] + 1),
        "length minus one": lambda m, t: t[0].__setitem__(3, t[0][3] - 1),
        "length negative": lambda m, t: t[0].__setitem__(3, -4),
        "length a float": lambda m, t: t[0].__setitem__(3, float(t[0][3])),
        "entries swapped": lambda m, t: t.__setitem__(slice(0, 2), [t[1], t[0]]),
        "entry dropped": lambda m, t: t.pop(),
        "codec dropped": lambda m, t: t.__setitem__(first, t[first][:4]),
        "codec on a raw entry": lambda m, t: t[raw_entry].append({"codec": "rans", "bits": 2, "cols": 1, "counts": [1, 0, 0, 0]}),
        "codec unknown": set_codec("codec", "huffman"),
        "f16 codec on a raw entry": lambda m, t: t[raw_entry].append({"codec": "f16"}),
        "f16 codec with an extra field": lambda m, t: t[first].__setitem__(4, {"codec": "f16", "bits": 2}),
        "codec extra field": set_codec("level", 3),
        "codec bits 9": set_codec("bits", 9),
        "codec bits 0": set_codec("bits", 0),
        "codec bits changed": lambda m, t: t[first][4].update(bits=t[first][4]["bits"] % 8 + 1),
        "codec cols 0": set_codec("cols", 0),
        "codec cols changed": lambda m, t: t[first][4].update(cols=t[first][4]["cols"] + 1),
        "counts too short": lambda m, t: t[first][4]["counts"].pop(),
        "counts negative": lambda m, t: t[first][4]["counts"].__setitem__(0, -1),
        "counts sum too high": lambda m, t: t[first][4]["counts"].__setitem__(0, t[first][4]["counts"][0] + 1),
        "counts moved": lambda m, t: t[first][4].update(counts=t[first][4]["counts"][::-1]),
        "counts all on one": lambda m, t: t[first][4].update(
            counts=[sum(t[first][4]["counts"])] + [0] * (len(t[first][4]["counts"]) - 1)),
        "coded shape huge": lambda m, t: t[first].__setitem__(2, [1 << 20, t[first][2][1]]),
        "coded shape huge, counts to match": lambda m, t: (t[first].__setitem__(2, [1 << 20, t[first][2][1]]),
                                                           t[first][4].update(counts=[(1 << 20) * t[first][4]["cols"]]
                                                                              + [0] * (len(t[first][4]["counts"]) - 1))),
        "tensor_count wrong": lambda m, t: m.__setitem__("tensor_count", m["tensor_count"] + 1),
        "manifest version 7": lambda m, t: m.__setitem__("version", 7),
    }
    for name, change in forged.items():
        cases[f"forged: {name}"] = (forge(change),)
    cases["forged: encoding json"] = (forge(lambda m, t: None, lambda md: md.update(manifest_encoding="json")),)
    cases["forged: no checksum"] = (forge(lambda m, t: None, lambda md: md.pop("manifest_sha256")),)
    cases["forged: data with 4 extra bytes"] = (forge(lambda m, t: None, blob=data + b"\0" * 4),)
    cases["forged: stream words shuffled"] = (forge(lambda m, t: None, blob=_shuffle_stream(data, stored, first)),)

    def extra_tensor(out: Path) -> None:
        from compress.format.checkpoint import atomic_save_safetensors
        from safetensors.torch import load_file

        atomic_save_safetensors(out, {**load_file(str(path)), "extra": torch.zeros(2, dtype=torch.uint8)},
                                json.loads(raw[8: start])["__metadata__"])
    cases["extra tensor"] = (extra_tensor,)
    cases["manifest tensor as F16"] = _retype_manifest(raw, start)

    def zlib_bomb(out: Path) -> None:  # 70 MB of spaces, ~70 KB compressed, with a matching checksum
        import hashlib
        import zlib

        from compress.format.checkpoint import atomic_save_safetensors

        text = b" " * 70_000_000
        atomic_save_safetensors(out, {"tensors": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                      "manifest": torch.frombuffer(bytearray(zlib.compress(text, 9)), dtype=torch.uint8)},
                                {"format": "compress-artifact/2", "manifest_encoding": "zlib",
                                 "manifest_sha256": hashlib.sha256(text).hexdigest()})
    cases["zlib bomb manifest"] = (zlib_bomb,)

    for case, content in cases.items():
        target = tmp_path / "damaged.safetensors"
        target.unlink(missing_ok=True)
        if isinstance(content, tuple) and callable(content[0]):
            content[0](target)
        else:
            target.write_bytes(content)
        try:
            load(target)
        except ArtifactError as exc:
            assert str(target) in str(exc), f"{case}: message must name the file: {exc}"
            continue
        raise AssertionError(f"{case}: loaded without an ArtifactError")


def _shuffle_stream(data: bytes, stored: dict, index: int) -> bytes:
    offset = sum(e[3] for e in stored["index"]["tensors"][:index])
    length = stored["index"]["tensors"][index][3]
    words = [data[offset + i: offset + i + 4] for i in range(0, length, 4)]
    words = words[1:] + words[:1]
    return data[:offset] + b"".join(words) + data[offset + length:]


def _retype_manifest(raw: bytes, start: int) -> bytes:
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + header_len])
    begin, end = header["manifest"]["data_offsets"]
    if (end - begin) % 2:  # keep the byte count consistent with F16, so only the dtype rule can refuse it
        header["manifest"]["dtype"] = "I8"
    else:
        header["manifest"].update(dtype="F16", shape=[(end - begin) // 2])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[start:]


def test_column_scaled_layers_round_trip(tmp_path: Path) -> None:
    import compress.quant as cq

    torch.manual_seed(0)
    model = build_model("compress:digits-cnn", num_classes=10).eval()
    batches = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    linear_only = cq.quantize(copy.deepcopy(model), batches, method="jlcm", bits=3, allocation="uniform",
                              column_scale=0.5, calib_steps=5)
    assert {e["kind"]: bool(e["layout"].get("column_scale")) for e in linear_only.quantization_plan["layers"]} == \
        {"conv": False, "linear": True}, "by default only fully connected layers get column scales"
    q = cq.quantize(model, batches, method="jlcm", bits=3, allocation="uniform", column_scale=0.5,
                    column_scale_layers="all", calib_steps=5)
    layouts = [e["layout"] for e in q.quantization_plan["layers"]]
    assert layouts and all(layout.get("column_scale") for layout in layouts)
    path = tmp_path / "scaled.safetensors"
    from compress.format.restorers import QUANT_META_KEY, artifact_plan

    meta = {QUANT_META_KEY: artifact_plan(q.quantization_plan)}
    write_artifact(path, q, {"model": SPEC, "model_meta": meta, "task": "classification"})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(path)(x), q(x))
