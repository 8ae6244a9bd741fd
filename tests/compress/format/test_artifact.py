import json
import random
import struct
import subprocess
import sys
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


def test_import_compress_does_not_import_triton() -> None:
    code = "import sys, compress, compress.format.artifact; assert 'triton' not in sys.modules, 'triton imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
