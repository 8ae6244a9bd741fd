"""User data never overwritten or mixed: runs own their directory, inputs stay untouched, paths stay inside."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from calib import DataError
from tests.hostile.conftest import RUN_RECIPE, refused, tree

SHRINK = ["--model", "compress:digits-cnn", "--num-classes", "10", "--method", "rtn", "--bits", "4",
          "--calib-samples", "4", "--batch-size", "4"]


def _recipe(folder: Path, text: str = RUN_RECIPE, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("# my notes\n" + text)
    return path


def test_shrink_output_is_the_input_checkpoint(corpus, capsys, tmp_path) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(corpus["checkpoint"].read_bytes())
    refused(capsys, ["shrink", str(ckpt), *SHRINK, "-o", str(ckpt)], r"that is the input checkpoint", tmp_path)


def test_run_out_dot_would_overwrite_the_recipe(capsys, tmp_path, monkeypatch) -> None:
    recipe = _recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["run", "recipe.yaml", "--out", "."], r"overwrite its own input recipe\.yaml", tmp_path)
    assert recipe.read_text().startswith("# my notes")


def test_run_out_holding_a_users_log(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("my own log\n")
    refused(capsys, ["run", str(recipe), "--out", str(out)], r"not from a compress run \(log\.txt\)", tmp_path)


def test_run_out_holding_foreign_files(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    (out / "recipe.yaml").write_text("mine")
    refused(capsys, ["run", str(recipe), "--out", str(out)], r"not from a compress run \(thesis\.tex\)", tmp_path)


def test_run_out_is_a_file(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path / "src")
    (tmp_path / "afile.txt").write_text("x")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "afile.txt")], r"is a file, not a folder", tmp_path)


def test_second_run_on_a_locked_out_names_the_holder(capsys, tmp_path) -> None:
    from compress.rundir import claim

    recipe = _recipe(tmp_path / "src")
    out = tmp_path / "out"
    with claim(out):  # what a first `compress run` holds while it works
        refused(capsys, ["run", str(recipe), "--out", str(out)], rf"another run is using this folder \(pid {os.getpid()}",
                tmp_path)
    assert not out.exists(), "the lock is released and the empty folder it made removed"


def test_resume_after_a_flipped_byte_in_a_stage_checkpoint(run_copy, finished_run, capsys) -> None:
    ckpt = run_copy / json.loads((run_copy / "report.json").read_text())["stages"][-1]["checkpoint"]
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x10
    ckpt.write_bytes(bytes(data))
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"],
            r"not the file stage evaluate wrote \(SHA-256", run_copy)


def test_resume_without_the_stored_recipe(run_copy, finished_run, capsys) -> None:
    (run_copy / "recipe.yaml").unlink()
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume", "--set", "seed=1"],
            r"recipe\.yaml is missing", run_copy)


def test_resume_with_another_seed(run_copy, finished_run, capsys) -> None:
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume", "--set", "seed=1"],
            r"used seed 0, the recipe says 1", run_copy)


def test_resume_of_an_unfinished_run_with_another_recipe(tmp_path, capsys, finished_run) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text((finished_run["run"] / "recipe.yaml").read_text().replace("seed: 0", "seed: 5"))
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(out)], r"holds an unfinished run", out)
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(out), "--resume"], r"is another recipe", out)


@pytest.mark.parametrize("where", ["../../../../etc/passwd", "/etc/passwd"])
def test_report_checkpoint_outside_the_run(run_copy, finished_run, capsys, where) -> None:
    report = json.loads((run_copy / "report.json").read_text())
    report["stages"][0]["checkpoint"] = where
    (run_copy / "report.json").write_text(json.dumps(report))
    refused(capsys, ["report", str(run_copy)], r"points outside the run directory", run_copy)
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"],
            r"points outside the run directory", run_copy)


def test_export_path_outside_the_run(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path / "src", RUN_RECIPE + "  - export: {path: ../escaped.safetensors}\n")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"points outside the run directory", tmp_path)


def _coco(tmp_path: Path, file_name: str) -> Path:
    from PIL import Image

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "x.jpg")  # outside the dataset
    Image.new("RGB", (16, 16)).save(root / "images" / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": file_name, "width": 16, "height": 16}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(ann))
    return root


@pytest.mark.parametrize("file_name", ["../../x.jpg", "/etc/hostname"])
def test_coco_file_name_outside_the_dataset(tmp_path, file_name) -> None:
    import calib

    root = _coco(tmp_path, file_name)
    with pytest.raises(DataError, match="points outside the dataset folder"):
        calib.get_dataset("coco", "train", root=root, use_all=True)


def test_voc_filename_outside_the_dataset(tmp_path) -> None:
    from PIL import Image

    import calib

    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (16, 16)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>../../../etc/hostname</filename><size><width>16</width><height>16</height></size>"
        "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "</annotation>")
    with pytest.raises(DataError, match="points outside the dataset folder"):
        calib.get_dataset("voc", "train", root=root, use_all=True)


def test_shrink_that_gives_nan_leaves_no_artifact(corpus, capsys, tmp_path) -> None:
    state = {k: v.clone() for k, v in corpus["plain"].state_dict().items()}
    state["head.bias"][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    out = tmp_path / "out.safetensors"
    refused(capsys, ["shrink", str(bad), *SHRINK, "-o", str(out)], r"NaN or inf: head\.bias", tmp_path)
    # huge (finite) weights: the outputs overflow; the check happens before anything reaches -o
    state = {k: v.clone() for k, v in corpus["plain"].state_dict().items()}
    state["head.weight"].fill_(3e38)
    huge = tmp_path / "huge.pt"
    torch.save(state, huge)
    before = tree(tmp_path)
    refused(capsys, ["shrink", str(huge), *SHRINK, "-o", str(out)], r"NaN or infinite", tmp_path)
    assert tree(tmp_path) == before and not out.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_two_runs_on_one_out_at_once(capsys, tmp_path) -> None:
    """A real second process: the first holds the lock while it trains; the second fails at once naming it."""
    import signal
    import subprocess
    import sys
    import time

    text = RUN_RECIPE.replace("- evaluate: {split: val}", "- finetune: {epochs: 5000, warmup_epochs: 0}")
    recipe = _recipe(tmp_path / "src", text)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (out / "log.txt").exists():
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        log_before = (out / "log.txt").read_text()
        from compress.cli import main

        capsys.readouterr()
        assert main(["run", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"another run is using this folder (pid {first.pid} on" in err, err
        assert (out / "log.txt").read_text().startswith(log_before), "the second run must not write to the log"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_report_checkpoint_symlinked_outside_the_run(run_copy, finished_run, capsys, tmp_path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x" * 64)
    ckpt = run_copy / json.loads((run_copy / "report.json").read_text())["stages"][0]["checkpoint"]
    ckpt.unlink()
    ckpt.symlink_to(secret)
    refused(capsys, ["report", str(run_copy)], r"points outside the run directory", run_copy)
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"],
            r"points outside the run directory", run_copy)


def test_onnx_export_over_its_artifact(corpus, capsys, tmp_path) -> None:
    artifact = tmp_path / "model.safetensors"
    artifact.write_bytes(corpus["artifact"].read_bytes())
    refused(capsys, ["export", str(artifact), "--onnx", str(artifact)], r"that is the input artifact", tmp_path)


def test_run_out_below_a_file(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path / "src")
    (tmp_path / "afile.txt").write_text("x")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "afile.txt" / "run")], r"afile\.txt is a file, not a folder",
            tmp_path)


def test_voc_image_set_id_outside_the_dataset(tmp_path) -> None:
    import calib

    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text("<annotation><size><width>16</width><height>16</height></size>"
                                                "</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("../../../../etc/x\n")
    with pytest.raises(DataError, match=r"train\.txt: file name '\.\./\.\./\.\./\.\./etc/x' points outside"):
        calib.get_dataset("voc", "train", root=root)
