"""Forged artifacts and checkpoints with valid checksums: refused (ArtifactError naming the field), never
loaded into a model that computes something else."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from compress.format.artifact import ArtifactError, load
from tests.hostile.conftest import SPEC, refused, write_forged_artifact, write_forged_checkpoint


def _forge(corpus, tmp_path: Path, manifest_change: Callable[[dict], Any] | None = None,
           tensors_change: Callable[[dict], Any] | None = None) -> Path:
    manifest = copy.deepcopy(corpus["manifest"])
    tensors = {k: v.clone() for k, v in corpus["tensors"].items()}
    if manifest_change:
        manifest_change(manifest)
    if tensors_change:
        tensors_change(tensors)
    return write_forged_artifact(tmp_path / "forged.safetensors", tensors, manifest)


def _prune(m: dict) -> dict:
    return m["model_meta"]["prune"]["modules"]


def _layer(m: dict, name: str) -> dict:
    return next(e for e in m["model_meta"]["quantization"]["layers"] if e["name"] == name)


def test_corpus_artifact_loads_and_runs(corpus) -> None:
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(corpus["artifact"])(x), corpus["model"](x))


def _i32(t: dict) -> None:
    t["stem.0.weight"] = t["stem.0.weight"].view(torch.int32)


def _group_id_too_big(t: dict) -> None:
    t["stage3.conv2.0.weight_group_ids"] = torch.full_like(t["stage3.conv2.0.weight_group_ids"], 0xFF)


def _order_out_of_range(t: dict) -> None:
    t["head.weight_order"] = t["head.weight_order"].clone()
    t["head.weight_order"][0] = 9000


def _order_duplicate(t: dict) -> None:
    t["head.weight_order"] = t["head.weight_order"].clone()
    t["head.weight_order"][1] = t["head.weight_order"][0]


def _nan(t: dict) -> None:
    t["stem.1.running_var"] = t["stem.1.running_var"].clone()
    t["stem.1.running_var"][0] = float("nan")


FORGED = {
    # wrong answers
    "int32 view of a float tensor": (None, _i32, r"tensor stem\.0\.weight is int32, the model needs float32"),
    "prune manifest sets BatchNorm eps": (lambda m: _prune(m)["stage3.conv1.1"]["attrs"].update(eps=10.0), None,
                                          r"model_meta\.prune\.modules\.stage3\.conv1\.1\.attrs\.eps: only size"),
    "prune manifest sets conv dilation": (lambda m: _prune(m)["stage3.conv1.0"]["attrs"].update(dilation=[2, 2]), None,
                                          r"attrs\.dilation: only size attributes"),
    "prune manifest channels disagree with the weight": (
        lambda m: _prune(m)["stage3.conv1.0"]["attrs"].update(out_channels=48), None,
        r"stage3\.conv1\.0: the size attributes do not agree"),
    "preprocessing std 0": (lambda m: m.update(preprocessing={"source": "x", "image_size": 32, "mean": [0.5],
                                                              "std": [0]}), None, r"preprocessing\.std must be > 0"),
    "preprocessing image_size -1": (lambda m: m.update(preprocessing={"source": "x", "image_size": -1}), None,
                                    r"preprocessing\.image_size must be an integer"),
    "manifest version 1 in a version-2 file": (lambda m: m.update(version=1), None,
                                               r"manifest version 1 does not match the file's format version 2"),
    "manifest version '1' as a string": (lambda m: m.update(version="1"), None, r"manifest version '1'"),
    "group ids out of range": (None, _group_id_too_big, r"group id 3 is out of range \(the layout has 3 groups\)"),
    "row order out of range": (None, _order_out_of_range, r"row order is not a permutation"),
    "row order with a duplicate": (None, _order_duplicate, r"row order is not a permutation"),
    "NaN in a tensor": (None, _nan, r"tensor stem\.1\.running_var holds NaN"),
    "quant layout bits 9": (lambda m: _layer(m, "head")["layout"].update(bits=9), None,
                            r"layers\.1\.layout\.bits must be an integer in \[1, 8\]"),
    "quant layout groups 0": (lambda m: _layer(m, "head")["layout"].update(groups=0), None,
                              r"layout\.groups must be an integer in \[1, "),
    "quant layout groups not matching the stored codebook": (
        lambda m: _layer(m, "head")["layout"].update(groups=5), None,
        r"tensor head\.weight_codebook is float16 \[2, 8\], the layout needs float16 \[5, 8\]"),
    "quant layout column_scale not a bool": (lambda m: _layer(m, "head")["layout"].update(column_scale="yes"), None,
                                             r"layout\.column_scale must be true or false"),
    "quant layout column scales without their tensor": (
        lambda m: _layer(m, "head")["layout"].update(column_scale=True), None,
        r"tensor head\.weight_column_scale of its layout is not in the file"),
    "quant attr not a weight": (lambda m: _layer(m, "head").update(attr="bias"), None, r"\.attr must be one of"),
    "unknown model_meta key": (lambda m: m["model_meta"].update(exec="x"), None, r"model_meta has unknown keys"),
    "task is neither": (lambda m: m.update(task="regression"), None, r"task must be one of"),
    "num_classes 0": (lambda m: m["model"].update(num_classes=0), None, r"model\.num_classes must be an integer"),
    "unknown builder family": (lambda m: m["model"].update(build="importlib:os"), None, r"is not a builder spec"),
    # resources
    "prune manifest with a 400 TB shape": (
        lambda m: _prune(m)["stage3.conv1.0"]["params"].update(weight=[10_000_000, 10_000_000, 1, 1]), None,
        r"params\.weight: shape \[10000000, 10000000, 1, 1\] but the file's tensor"),
    "prune manifest with a huge buffer": (
        lambda m: _prune(m)["stage3.conv1.1"]["buffers"].update(spare=[1 << 27, 1 << 20]), None,
        r"larger than any tensor in the file|must be an integer"),
    # messages
    "prune manifest names a missing layer": (
        lambda m: _prune(m).update({"stage9.conv": copy.deepcopy(_prune(m)["stage3.conv1.0"])}), None,
        r"module 'stage9\.conv' does not exist"),
    "quant plan names a missing layer": (lambda m: _layer(m, "head").update(name="tail"), None,
                                         r"tensor tail\.weight_packed of its layout is not in the file"),
    "negative shape": (lambda m: _prune(m)["stage3.conv1.0"]["params"].update(weight=[-40, 64, 3, 3]), None,
                       r"params\.weight must be an integer in \[0, "),
    "prune manifest names another module type": (
        lambda m: _prune(m)["stage3.conv1.0"].update(type="Linear"), None,
        r"module 'stage3\.conv1\.0' is a Conv2d, the manifest expects a Linear"),
    "builder option the builder does not take": (lambda m: m["model"].update(options={"wdith": 3}), None,
                                                 r"does not describe a buildable model .*wdith"),
    "quant layer listed twice": (lambda m: m["model_meta"]["quantization"]["layers"].append(
        copy.deepcopy(_layer(m, "head"))), None, r"layers\.2: layer head is listed twice"),
    "prune manifest is a list": (lambda m: m["model_meta"].update(prune=[1, 2]), None,
                                 r"model_meta\.prune must be a JSON object \(got list\)"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_artifact_is_refused(corpus, tmp_path, case) -> None:
    manifest_change, tensors_change, pattern = FORGED[case]
    path = _forge(corpus, tmp_path, manifest_change, tensors_change)
    with pytest.raises(ArtifactError, match=pattern) as caught:
        load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("raw, pattern", [("{not json", r"manifest is not valid JSON"),
                                          ("[1, 2, 3]", r"manifest must be a JSON object \(got list\)"),
                                          ('"text"', r"manifest must be a JSON object \(got str\)")])
def test_manifest_that_is_not_an_object(corpus, tmp_path, capsys, raw, pattern) -> None:
    path = write_forged_artifact(tmp_path / "a.safetensors", corpus["tensors"], None, raw_manifest=raw)
    with pytest.raises(ArtifactError, match=pattern):
        load(path)
    refused(capsys, ["eval", str(path), "--data", "digits:val"], pattern, tmp_path)


def test_eval_of_a_classifier_on_detection_data(corpus, capsys, tmp_path) -> None:
    refused(capsys, ["eval", str(corpus["artifact"]), "--data", "digits-detect:val"],
            r"a detection source, but .* is a classification model", tmp_path)


def test_int32_weights_in_a_checkpoint(corpus, capsys, tmp_path) -> None:
    state = {k: v.clone() for k, v in corpus["plain"].state_dict().items()}
    state["head.weight"] = (state["head.weight"] * 100).to(torch.int32)
    path = tmp_path / "int.pt"
    torch.save(state, path)
    refused(capsys, ["shrink", str(path), "--model", "compress:digits-cnn", "--num-classes", "10", "--method", "rtn",
                     "--calib-samples", "4", "-o", str(tmp_path / "o.safetensors")],
            r"wrong dtype: head\.weight \(checkpoint int32 vs model float32\)", tmp_path)


def test_stage_checkpoint_without_checksum(corpus, capsys, tmp_path) -> None:
    tensors = {k: v.detach().clone() for k, v in corpus["plain"].state_dict().items()}
    path = write_forged_checkpoint(tmp_path / "c.safetensors", tensors, SPEC, {}, checksum=False)
    refused(capsys, ["eval", str(path), "--data", "digits:val"], r"has no tensor checksum", tmp_path)


def test_stage_checkpoint_with_a_forged_prune_manifest(corpus, capsys, tmp_path) -> None:
    tensors = {k: v.detach().clone() for k, v in corpus["plain"].state_dict().items()}
    meta = {"prune": {"version": 1, "modules": {"stem.1": {"type": "BatchNorm2d", "attrs": {"momentum": 0.5},
                                                           "params": {}, "buffers": {}}}}}
    path = write_forged_checkpoint(tmp_path / "c.safetensors", tensors, SPEC, meta)
    refused(capsys, ["inspect", str(path)], r"attrs\.momentum: only size attributes", tmp_path)


def test_stage_checkpoint_metadata_not_json(corpus, capsys, tmp_path) -> None:
    from compress.format.header import tensors_sha256
    from compress.format.checkpoint import atomic_save_safetensors

    tensors = {k: v.detach().clone() for k, v in corpus["plain"].state_dict().items()}
    path = tmp_path / "c.safetensors"
    atomic_save_safetensors(path, tensors, {"compress.model_spec": "{not json", "compress.model_meta": "{}",
                                            "compress.tensors_sha256": tensors_sha256(tensors)})
    refused(capsys, ["eval", str(path), "--data", "digits:val"], r"metadata compress\.model_spec is not valid JSON",
            tmp_path)
