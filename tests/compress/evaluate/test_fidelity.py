"""Fidelity without labels: agreement figures, box matching, `compress eval --against` and its errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from calib import get_dataset
from compress.cli import main
from compress.evaluate.fidelity import ClassificationAgreement, DetectionAgreement, match_boxes
from compress.models import build_model
from compress.shrink import shrink
from compress.stages.recover import reestimate_bn

SPEC = "compress:digits-cnn"


def test_agreement_figures_on_known_logits() -> None:
    acc = ClassificationAgreement()
    original = torch.tensor([[10.0, 0, 0, 0, 0, 0], [0.1, 0.0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]])
    compressed = torch.tensor([[10.0, 0, 0, 0, 0, 0], [0.0, 0.1, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0]])
    acc.update(original, compressed)
    out = acc.compute()
    assert out["images"] == 3 and out["agreement"] == pytest.approx(1 / 3)
    # images 0 and 2 are confident (prob >= 0.5); image 1 (near uniform) is not
    assert out["confident_images"] == 2 and out["confident_agreement"] == pytest.approx(0.5)
    po, pc = original.softmax(1), compressed.softmax(1)
    kl = (po * (po.log() - pc.log())).sum(1).mean()
    assert out["kl"] == pytest.approx(float(kl), rel=1e-5)
    same = ClassificationAgreement()
    same.update(original, original.clone())
    assert same.compute()["kl"] == pytest.approx(0.0, abs=1e-7) and same.compute()["top5_overlap"] == 1.0
    with pytest.raises(ValueError, match="not the same classes"):
        acc.update(original, compressed[:, :5])


def test_top5_overlap_counts_shared_classes() -> None:
    acc = ClassificationAgreement()
    original = torch.arange(10.0)[None]          # top-5: 9 8 7 6 5
    compressed = torch.arange(10.0).flip(0)[None]  # top-5: 0 1 2 3 4
    acc.update(original, compressed)
    assert acc.compute()["top5_overlap"] == 0.0
    compressed = torch.tensor([[1.0, 1, 0, 0, 0, 9, 8, 7, 0, 0]])  # top-5 5 6 7 0 1: shares 5 6 7
    acc = ClassificationAgreement()
    acc.update(original, compressed)
    assert acc.compute()["top5_overlap"] == pytest.approx(3 / 5)


def test_box_matching_needs_label_iou_and_score() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    original = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.2]), "labels": torch.tensor([1, 2, 3])}
    compressed = {"boxes": torch.tensor([[1.0, 1, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70]]),
                  "scores": torch.tensor([0.5, 0.9, 0.4]), "labels": torch.tensor([1, 0, 1])}
    # box 0 matches (same label, IoU 0.81); box 1 has another label; box 2 is below the score threshold
    assert match_boxes(original, compressed) == (1, 2, 3)
    acc = DetectionAgreement()
    acc.update([original], [compressed])
    out = acc.compute()
    assert out["box_f1"] == pytest.approx(2 / 5) and out["box_recall"] == 0.5
    assert match_boxes(original, original) == (2, 2, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An original digits-cnn checkpoint, its 2-bit artifact, a 5-class checkpoint and a foreign state dict."""
    folder = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=10)
    # BN statistics of photos and a head scaled so that the outputs differ between images (some confident)
    photos = get_dataset("photos", "train", samples=32, image_size=32)
    reestimate_bn(model, [torch.stack([photos[i][0] for i in range(32)])])
    with torch.no_grad():
        logits = model.eval()(torch.stack([photos[i][0] for i in range(32)]))
        model.head.weight.mul_(4.0 / float(logits.std(0).mean()))
    paths = {"original": folder / "original.pt", "five": folder / "five.pt", "foreign": folder / "foreign.pt"}
    torch.save(model.state_dict(), paths["original"])
    torch.save(build_model(SPEC, num_classes=5).state_dict(), paths["five"])
    torch.save(nn.Sequential(nn.Linear(3, 4)).state_dict(), paths["foreign"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, bits in (("art2", 2.0), ("art8", 8.0)):
            paths[name] = folder / f"{name}.safetensors"
            shrink(paths["original"], SPEC, paths[name], 10, bits=bits, method="rtn" if bits == 8 else "jlcm",
                   calib="photos", calib_samples=8, image_size=32, batch_size=8, quiet=True,
                   quant_options={"calib_steps": 5, "allocation": "uniform"} if bits != 8 else {"allocation": "uniform"})
    finally:
        torch.set_num_threads(before)
    return paths


def _eval(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_against_a_checkpoint_and_an_artifact(models: dict[str, Path], capsys: pytest.CaptureFixture,
                                                   one_thread: None) -> None:
    common = ["--data", "photos:val", "--samples", "24", "--json"]
    code, out, err = _eval([str(models["art8"]), *common, "--against", str(models["original"]), "--model", SPEC],
                           capsys)
    assert code == 0, err
    near = json.loads(out.strip().splitlines()[-1])
    assert near["images"] == 24 and set(near) >= {"confident_agreement", "agreement", "top5_overlap", "kl"}
    code, out, err = _eval([str(models["art2"]), *common, "--against", str(models["original"]), "-m", SPEC], capsys)
    assert code == 0, err
    far = json.loads(out.strip().splitlines()[-1])
    # 8-bit round-to-nearest stays closer to the original than a 2-bit model
    assert near["kl"] < far["kl"] and near["agreement"] >= far["agreement"] and near["agreement"] >= 0.9
    # against another artifact (its own manifest gives builder and preprocessing); itself: perfect agreement
    code, out, err = _eval([str(models["art2"]), *common, "--against", str(models["art2"])], capsys)
    assert code == 0, err
    self_ = json.loads(out.strip().splitlines()[-1])
    assert self_["agreement"] == 1.0 and self_["kl"] == pytest.approx(0.0, abs=1e-6)
    assert self_["confident_agreement"] == 1.0 or math.isnan(self_["confident_agreement"])


@pytest.mark.parametrize("case, needle", [
    ("missing", "file not found"),
    ("foreign", "is not a compress:digits-cnn checkpoint"),
    ("five", "has 5 classes"),
    ("no-model", "pass --model"),
])
def test_bad_against_is_one_line_naming_it(models: dict[str, Path], capsys: pytest.CaptureFixture, case: str,
                                           needle: str, tmp_path: Path) -> None:
    against = {"missing": tmp_path / "nope.pt", "no-model": models["original"]}.get(case, models.get(case))
    args = [str(models["art2"]), "--data", "photos:val", "--samples", "4", "--against", str(against)]
    if case != "no-model":
        args += ["--model", SPEC]
    code, _, err = _eval(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(against) in lines[0], err


def test_unlabelled_data_without_against_is_refused(models: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    code, _, err = _eval([str(models["art2"]), "--data", "photos:val", "--samples", "4"], capsys)
    assert code == 2 and "--against" in err
