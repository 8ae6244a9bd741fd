"""One clear line, exit 2, for every bad input; nothing written on the way."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.hostile.conftest import RUN_RECIPE, refused, tree


def _recipe(tmp_path: Path, text: str = RUN_RECIPE) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    path = tmp_path / "src" / "r.yaml"
    path.write_text(text)
    return path


def _damaged(corpus, tmp_path: Path, how: str) -> Path:
    raw = bytearray(corpus["artifact"].read_bytes())
    (length,) = struct.unpack("<Q", bytes(raw[:8]))
    if how == "data byte":
        raw[-5] ^= 0x01
    elif how == "truncated":
        raw = raw[: len(raw) - 100]
    elif how == "version":
        header = json.loads(bytes(raw[8: 8 + length]))
        header["__metadata__"]["format"] = "compress-artifact/7"
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        raw = bytearray(struct.pack("<Q", len(text)) + text + bytes(raw[8 + length:]))
    path = tmp_path / f"{how.replace(' ', '-')}.safetensors"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("how, pattern", [("data byte", r"tensor data checksum mismatch"),
                                          ("truncated", r"truncated or damaged|do not fit"),
                                          ("version", r"format version '7' is not supported")])
def test_eval_shows_the_loaders_reason(corpus, capsys, tmp_path, how, pattern) -> None:
    path = _damaged(corpus, tmp_path, how)
    err = refused(capsys, ["eval", str(path), "--data", "digits:val"], pattern, tmp_path)
    assert "neither" not in err


def test_eval_of_a_foreign_safetensors(capsys, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    refused(capsys, ["eval", str(tmp_path / "foreign.safetensors"), "--data", "digits:val"], r"not a compress artifact",
            tmp_path)


def test_binary_recipe(capsys, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "r.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    refused(capsys, ["run", str(path), "--out", str(tmp_path / "out")], r"not a UTF-8 text file", tmp_path)


def test_num_classes_smaller_than_the_data(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path, RUN_RECIPE.replace("num_classes: 10", "num_classes: 3"))
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")],
            r"model\.num_classes is 3 but data\.train \(digits\) has 10 classes", tmp_path)


def test_unknown_model_option(capsys, tmp_path) -> None:
    recipe = _recipe(tmp_path, RUN_RECIPE.replace("num_classes: 10}", "num_classes: 10, options: {wdith: 3}}"))
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"does not take these options.*wdith",
            tmp_path)


@pytest.mark.parametrize("value", ["[1, 2", "{a: 1", "a: b: c"])
def test_invalid_yaml_in_set(capsys, tmp_path, value) -> None:
    recipe = _recipe(tmp_path)
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out"), "--set", f"seed={value}"],
            r"--set seed: not valid YAML", tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", "{\"stages\": 3}", "{\"stages\": [{\"name\": 1}]}", "not json",
                                     "{\"stages\": [{\"name\": \"input\", \"checkpoint\": 5}]}"])
def test_broken_report_json(run_copy, finished_run, capsys, content) -> None:
    (run_copy / "report.json").write_text(content)
    refused(capsys, ["report", str(run_copy)], r"report\.json", run_copy)
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"], r"report\.json", run_copy)


@pytest.mark.parametrize("content, pattern", [("stages: [\n  - a: 1\n   b", r"not valid YAML"),
                                              ("- just\n- a list\n", r"not a resolved recipe"),
                                              ("seed: 0\nseed: 1\nstages: []\n", r"duplicate key 'seed'")])
def test_broken_recipe_yaml_in_the_run(run_copy, finished_run, capsys, content, pattern) -> None:
    (run_copy / "recipe.yaml").write_text(content)
    refused(capsys, ["run", str(finished_run["recipe"]), "--out", str(run_copy), "--resume"], pattern, run_copy)


def test_report_stage_with_bad_numbers(run_copy, capsys) -> None:
    report = json.loads((run_copy / "report.json").read_text())
    report["stages"][0]["size_bytes"] = 0
    (run_copy / "report.json").write_text(json.dumps(report))
    refused(capsys, ["report", str(run_copy)], r"stages\.0: params and size_bytes must be > 0", run_copy)


def test_calib_empty(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["shrink", "none", "--model", "compress:digits-cnn", "--num-classes", "10", "--calib", "",
                     "-o", str(tmp_path / "o.safetensors")], r"--calib is empty", tmp_path)


def test_eval_folder_needs_root_and_takes_it(corpus, capsys, tmp_path) -> None:
    from PIL import Image

    refused(capsys, ["eval", str(corpus["artifact"]), "--data", "folder:val"], r"--root on the command line", tmp_path)
    for label in "0123456789":
        (tmp_path / "imgs" / "val" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "val" / label / "a.png")
    from compress.cli import main

    capsys.readouterr()
    assert main(["eval", str(corpus["artifact"]), "--data", "folder:val", "--root", str(tmp_path / "imgs"),
                 "--json"]) == 0
    assert "top1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_bad_batch_size(corpus, capsys, tmp_path) -> None:
    refused(capsys, ["eval", str(corpus["artifact"]), "--data", "digits:val", "--batch-size", "0"],
            r"--batch-size must be > 0", tmp_path)


def test_run_refusals_write_nothing(capsys, tmp_path) -> None:
    """The same bad recipes leave no --out folder behind (checked once more over the whole tmp tree)."""
    before = tree(tmp_path)
    recipe = _recipe(tmp_path, RUN_RECIPE.replace("num_classes: 10", "num_classes: 3"))
    from compress.cli import main

    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and set(tree(tmp_path)) - set(before) == {"src/r.yaml"}


def test_shrink_std_not_finite(capsys, tmp_path) -> None:
    refused(capsys, ["shrink", "none", "--model", "compress:digits-cnn", "--num-classes", "10", "--std", "nan",
                     "-o", str(tmp_path / "o.safetensors")], r"--std 'nan': every value must be a finite number",
            tmp_path)
