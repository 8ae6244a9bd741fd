"""Data never names code: no file named inside an artifact, checkpoint or report is imported or read."""
from __future__ import annotations

from pathlib import Path

import pytest

from compress.format.artifact import ArtifactError, load
from tests.hostile.conftest import SPEC, refused, write_forged_artifact, write_forged_checkpoint

HELPER = """
from pathlib import Path
Path({marker!r}).write_text("code ran")
def build(num_classes=10, **kw):
    from compress.models import build_model
    return build_model("compress:digits-cnn", num_classes=num_classes)
"""


@pytest.fixture
def helper(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    path = tmp_path / "helper.py"
    path.write_text(HELPER.format(marker=str(marker)))
    return path, marker


@pytest.fixture
def file_checkpoint(corpus, helper, tmp_path: Path) -> Path:
    tensors = {k: v.detach().clone() for k, v in corpus["plain"].state_dict().items()}
    spec = {**SPEC, "build": f"file:{helper[0]}:build"}
    return write_forged_checkpoint(tmp_path / "ckpt.safetensors", tensors, spec, {})


def test_eval_of_a_checkpoint_naming_a_python_file(file_checkpoint, helper, capsys, tmp_path) -> None:
    refused(capsys, ["eval", str(file_checkpoint), "--data", "digits:val"], r"never imported", tmp_path)
    assert not helper[1].exists()


def test_inspect_of_a_checkpoint_naming_a_python_file(file_checkpoint, helper, capsys, tmp_path) -> None:
    refused(capsys, ["inspect", str(file_checkpoint)], r"model\.build .*file:.*never imported", tmp_path)
    assert not helper[1].exists()


def test_model_file_option_must_be_the_named_file(file_checkpoint, helper, capsys, tmp_path) -> None:
    other = tmp_path / "other.py"
    other.write_text("raise SystemExit('must not run')\n")
    refused(capsys, ["inspect", str(file_checkpoint), "--model-file", str(other)], r"names another file", tmp_path)
    assert not helper[1].exists()


def test_artifact_naming_a_python_file(corpus, helper, capsys, tmp_path) -> None:
    manifest = {**corpus["manifest"], "model": {**SPEC, "build": f"file:{helper[0]}:build", "file_sha256": "0" * 64}}
    path = write_forged_artifact(tmp_path / "a.safetensors", corpus["tensors"], manifest)
    with pytest.raises(ArtifactError, match="never imported"):
        load(path)
    refused(capsys, ["eval", str(path), "--data", "digits:val"], r"never imported", tmp_path)
    # even when the user passes a file, it must be the recorded one (sha256)
    with pytest.raises(ArtifactError, match="not the file the model was built from"):
        load(path, model_file=helper[0])
    assert not helper[1].exists()


@pytest.mark.parametrize("option, value", [("checkpoint_path", "/etc/passwd"), ("pretrained", True),
                                           ("pretrained_cfg_overlay", {"file": "/etc/passwd"}),
                                           ("drop_rate", "../../x")])
def test_artifact_options_naming_files(corpus, capsys, tmp_path, option, value) -> None:
    manifest = {**corpus["manifest"], "model": {**SPEC, "build": "timm:resnet18", "options": {option: value}}}
    path = write_forged_artifact(tmp_path / "a.safetensors", corpus["tensors"], manifest)
    with pytest.raises(ArtifactError, match=rf"model\.options\.{option}"):
        load(path)


def test_resume_from_a_checkpoint_switched_to_a_python_file(run_copy, corpus, helper, capsys, finished_run) -> None:
    import json

    ckpt = run_copy / json.loads((run_copy / "report.json").read_text())["stages"][-1]["checkpoint"]
    tensors = {k: v.detach().clone() for k, v in corpus["plain"].state_dict().items()}
    write_forged_checkpoint(ckpt, tensors, {**SPEC, "build": f"file:{helper[0]}:build"}, {})
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"],
            r"not the file stage .* wrote", run_copy)
    refused(capsys, ["report", str(run_copy)], r"not the file stage evaluate wrote", run_copy)
    assert not helper[1].exists()


def test_distill_teacher_naming_a_python_file(file_checkpoint, helper, capsys, tmp_path) -> None:
    from tests.hostile.conftest import RUN_RECIPE

    (tmp_path / "src").mkdir()
    recipe = tmp_path / "src" / "r.yaml"
    recipe.write_text(RUN_RECIPE.replace("- evaluate: {split: val}",
                                         f"- distill: {{teacher: {file_checkpoint}, epochs: 1}}"))
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"never imported", tmp_path)
    assert not helper[1].exists() and not (tmp_path / "out").exists()


def test_onnx_export_of_an_artifact_naming_a_python_file(corpus, helper, capsys, tmp_path) -> None:
    manifest = {**corpus["manifest"], "model": {**SPEC, "build": f"file:{helper[0]}:build", "file_sha256": "0" * 64}}
    path = write_forged_artifact(tmp_path / "a.safetensors", corpus["tensors"], manifest)
    refused(capsys, ["export", str(path), "--onnx", str(tmp_path / "m.onnx")], r"never imported", tmp_path)
    assert not helper[1].exists()


def test_option_rules() -> None:
    from compress.format.validate import check_options

    assert check_options({"pretrained": False, "drop_rate": 0.1, "widths": [8, 16], "act_layer": "relu"}, "f")
    for bad in ({"pretrained": True}, {"checkpoint_path": "w.pt"}, {"cache_dir": "x"}, {"x": {"a": 1}},
                {"x": "a/b"}, {"x": float("nan")}, {"not an identifier": 1}):
        with pytest.raises(ArtifactError, match=r"model\.options"):
            check_options(bad, "f")


def test_model_file_named_by_the_user_is_used(file_checkpoint, helper, capsys) -> None:
    """The same checkpoint opens when the user names the file themselves (and only then does it run)."""
    from compress.cli import main

    assert main(["inspect", str(file_checkpoint), "--model-file", str(helper[0]), "--image-size", "32"]) == 0
    assert helper[1].exists()
