"""compress.shrink: checkpoint checks, preprocessing per model family, the one-shot pipeline end to end."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import compress
from compress.format.artifact import read_artifact
from compress.errors import UserError
from compress.models import CheckpointError, build_model
from compress.shrink import shrink
from compress.shrink.data import Prepared, calib_ref
from compress.shrink.preprocess import IMAGENET_MEAN, Preprocessing, parse_floats, resolve
from compress.models.protocol import raw_outputs
from compress.stages.recover import reestimate_bn

SPEC = "compress:digits-cnn"
FAST = {"calib_samples": 16, "batch_size": 8, "quant_options": {"calib_steps": 10, "sensitivity_samples": 8}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A digits-cnn with non-trivial weights and BN statistics, saved as a plain torch state dict."""
    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.05
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_missing_and_unexpected_keys_are_listed(trained, tmp_path: Path) -> None:
    path, model = trained
    state = dict(model.state_dict())
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as info:
        shrink(bad, SPEC, tmp_path / "o.safetensors", 10, **FAST)
    message = str(info.value)
    assert "missing keys: head.weight" in message and "unexpected keys: extra.weight" in message
    assert "\n" not in message
    assert not (tmp_path / "o.safetensors").exists()


def test_pickled_module_is_refused_with_one_line(trained, tmp_path: Path) -> None:
    _, model = trained
    bad = tmp_path / "whole_model.pt"
    torch.save(model, bad)  # pickles the module class: weights_only=True must refuse it
    with pytest.raises(CheckpointError) as info:
        shrink(bad, SPEC, tmp_path / "o.safetensors", 10, **FAST)
    message = str(info.value)
    assert "not a plain state dict" in message and "weights_only=True" in message and "DigitsCNN" in message
    assert "\n" not in message


def test_wrong_num_classes_names_the_mis_shaped_key(trained, tmp_path: Path) -> None:
    path, _ = trained
    with pytest.raises(CheckpointError, match="head.weight"):
        shrink(path, SPEC, tmp_path / "o.safetensors", 7, **FAST)


@pytest.fixture(scope="module")
def shrunk_by_keywords(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """The trained checkpoint shrunk with keywords (prune 0.3, 3 bits, recovery): the artifact, the figures and the
    lines printed; checked end to end below and compared with the ShrinkConfig route in
    test_config_object_and_keywords_give_the_same_artifact."""
    path, _ = trained
    out = tmp_path_factory.mktemp("shrink") / "small.safetensors"
    lines: list[str] = []
    result = shrink(path, SPEC, out, 10, prune=0.3, bits=3, recover=True, recover_steps=2, printer=lines.append, **FAST)
    return out, result, lines


def test_shrink_end_to_end_tiny_model(shrunk_by_keywords) -> None:
    out, result, lines = shrunk_by_keywords
    text = "\n".join(lines)
    assert "preprocessing: compress: model" in text and "stage 1/3: prune" in text and "recover:" in text
    assert result["params_after"] < result["params_before"]
    assert result["file_bytes"] == out.stat().st_size < result["before_bytes"] / 5
    assert 2.0 < result["quantized_bits_per_weight"] <= 3.0 + 1e-6, "the target is met by what is quantized"
    assert result["bits_per_weight"] > result["quantized_bits_per_weight"], "float BN and biases come on top"
    assert result["verify_max_diff"] <= 1e-4
    _, manifest = read_artifact(out)
    assert manifest["preprocessing"]["image_size"] == 32 and manifest["shrink"]["labels_used"] is False
    assert [s["name"] for s in result["stages"]] == ["input", "prune", "recover", "quantize", "export"]
    assert result["file_bits_per_param"] == pytest.approx(8 * out.stat().st_size / result["params_after"], abs=1e-3)
    _, manifest = read_artifact(out)
    assert manifest["model_meta"]["bn_fold"]["pairs"], "JLCM folded the BNs, so export removes them"
    loaded = compress.load(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    y = loaded(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_checkpoint_is_loaded_not_random(trained, tmp_path: Path) -> None:
    """Without pruning and at 8 bits the artifact must reproduce the checkpoint's outputs closely."""
    path, model = trained
    out = tmp_path / "q8.safetensors"
    shrink(path, SPEC, out, 10, bits=8, method="rtn", quiet=True, **{**FAST, "quant_options": {}})
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), compress.load(out)(x)
    assert torch.allclose(want, got, atol=0.05 * want.abs().max().item())


def test_safetensors_checkpoint_and_quiet(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    _, model = trained
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    shrink(st, SPEC, tmp_path / "o.safetensors", 10, bits=4, method="rtn", quiet=True, **{**FAST, "quant_options": {}})
    assert capsys.readouterr().out == ""


def test_bad_settings_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--prune"):
        shrink(None, SPEC, tmp_path / "o.safetensors", 10, prune=1.5)
    with pytest.raises(UserError, match="held back"):
        shrink(None, SPEC, tmp_path / "o.safetensors", 10, calib="digits:val")
    with pytest.raises(UserError, match="unknown data source 'digitz'"):
        shrink(None, SPEC, tmp_path / "o.safetensors", 10, calib="digitz")
    with pytest.raises(UserError, match="not a detector"):
        shrink(None, SPEC, tmp_path / "o.safetensors", 10, task="detection")
    with pytest.raises(UserError, match="allocation uniform needs whole bits"):
        shrink(None, SPEC, tmp_path / "o.safetensors", 10, method="rtn", bits=2.5, calib_samples=4)


def test_folder_of_unlabelled_images(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    ref = calib_ref(str(folder))
    assert ref["source"] == "folder" and ref["options"]["use_all"]
    result = shrink(None, SPEC, tmp_path / "o.safetensors", 10, calib=str(folder), image_size=24, bits=4,
                    method="rtn", quiet=True, calib_samples=6)
    assert result["preprocessing"]["image_size"] == 24


def test_preprocessing_per_family() -> None:
    timm_model = build_model("timm:resnet18", num_classes=10)
    pre = resolve("timm:resnet18", timm_model, "classification", 32)
    assert pre.image_size == 224 and pre.mean == IMAGENET_MEAN and pre.crop_pct < 1 and "timm data config" in pre.source
    tv = build_model("torchvision:resnet18", num_classes=10)
    pre = resolve("torchvision:resnet18", tv, "classification", 32)
    assert pre.image_size == 224 and pre.mean == IMAGENET_MEAN and "torchvision" in pre.source
    own = build_model(SPEC, num_classes=10)
    pre = resolve(SPEC, own, "classification", 32)
    assert pre.mean is None and pre.image_size == 32
    pre = resolve(SPEC, own, "classification", 32, image_size=40, mean=(0.5, 0.5, 0.5))
    assert pre.image_size == 40 and pre.mean == (0.5,) * 3 and "from the command line" in pre.source
    assert parse_floats("0.5", "--mean") == (0.5, 0.5, 0.5)
    with pytest.raises(UserError):
        parse_floats("1,2", "--std")


def test_preprocessing_apply_crop_and_boxes() -> None:
    pre = Preprocessing("t", 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.5)
    image, _, _ = pre.apply(torch.full((3, 32, 32), 0.75))
    assert image.shape == (3, 8, 8) and torch.allclose(image, torch.ones_like(image))
    det = Preprocessing("t", 64)
    image, scale, offset = det.apply(torch.rand(3, 128, 128), crop=False)
    assert image.shape == (3, 64, 64) and scale == 0.5 and offset == (0.0, 0.0)
    back = Preprocessing.from_dict(pre.to_dict())
    assert back == pre


def test_detection_items_from_unlabelled_images() -> None:
    base = [(torch.rand(3, 16, 16), -1)]
    data = Prepared(base, Preprocessing("t", 8), "detection")
    image, target = data[0]
    assert image.shape == (3, 8, 8) and target["boxes"].shape == (0, 4)


def test_bn_reestimation_matches_the_calibration_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    assert reestimate_bn(model, [x[:4], x[4:]]) == 1
    feats = model[0](x)
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert model[1].momentum == 0.1 and not model[1].training


def test_raw_outputs_survive_a_deepcopy() -> None:
    """quantize deep-copies the model inside the block: the copy must run its own layers."""
    model = build_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with raw_outputs(model):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            out = model(x)
            for p in twin.parameters():
                p.data.zero_()
            assert isinstance(out, dict) and set(out) == {"bbox_regression", "cls_logits"}
            assert not torch.equal(model(x)["cls_logits"], twin(x)["cls_logits"])
    assert "forward" not in vars(model)
    with torch.no_grad():
        assert isinstance(model([x[0]]), list), "the detector's own protocol is back"


def test_a_model_that_cannot_run_names_the_layer(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        shrink(None, "timm:vit_tiny_patch16_224", tmp_path / "v.safetensors", 10, image_size=64, calib_samples=4)
    message = str(info.value)
    assert "layer patch_embed (PatchEmbed)" in message and "Input height (64)" in message and "\n" not in message


@pytest.mark.slow
def test_two_stage_detector_end_to_end(tmp_path: Path) -> None:
    """Faster R-CNN (RPN + ROI heads): pruned, recovered and quantized on its raw outputs (ROI heads on fixed
    boxes); the artifact reloads with torchvision's protocol and the same raw outputs."""
    out = tmp_path / "frcnn.safetensors"
    result = shrink(None, "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", out, 3, task="detection",
                    calib="digits-detect", prune=0.3, bits=4, method="rtn", calib_samples=2, batch_size=2,
                    recover=True, recover_steps=1, quiet=True, image_size=64)  # 64 px calibration images
    assert abs(result["params_after"] / result["params_before"] - 0.7) <= 0.02, result
    model = compress.load(out)
    with torch.no_grad():
        detections = model([torch.rand(3, 96, 96)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.slow
def test_detector_tensor_protocol_end_to_end(tmp_path: Path) -> None:
    """compress:yolo-n on digits-detect: prune + label-free recovery + quantize; the artifact detects."""
    out = tmp_path / "yolo.safetensors"
    result = shrink(None, "compress:yolo-n", out, 10, task="detection", calib="digits-detect", prune=0.3, bits=4,
                    method="rtn", calib_samples=8, batch_size=4, recover=True, recover_steps=2,
                    quiet=True)
    assert result["params_after"] < 0.8 * result["params_before"]
    model = compress.load(out)
    with torch.no_grad():
        detections = model.postprocess(model(torch.rand(1, 3, 128, 128)))
    assert set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.slow
def test_torchvision_detector_end_to_end(tmp_path: Path) -> None:
    """The issue's ssdlite example, cut down (rtn, 4 images): calibration runs on the raw head outputs and the
    artifact keeps torchvision's protocol."""
    out = tmp_path / "ssd.safetensors"
    result = shrink(None, "torchvision:ssdlite320_mobilenet_v3_large", out, 11, task="detection",
                    calib="digits-detect", bits=4, method="rtn", calib_samples=4, batch_size=4, quiet=True)
    assert "normalises and resizes inside" in result["preprocessing"]["source"]
    model = compress.load(out)
    with torch.no_grad():
        detections = model([torch.rand(3, 128, 128)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_overshooting_prune_warns_on_stderr_even_when_quiet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A random init has all BN scales equal: tied channels go together, past the target; shrink says so."""
    result = shrink(None, SPEC, tmp_path / "w.safetensors", 10, prune=0.3, method="rtn", bits=4, calib_samples=8,
                    recover_steps=0, quiet=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    if result["params_after"] < 0.65 * result["params_before"]:
        assert "warning: pruning removed" in captured.err and "more than the 30% asked" in captured.err
    else:
        assert captured.err == ""


def test_config_object_and_keywords_give_the_same_artifact(trained, shrunk_by_keywords, tmp_path: Path) -> None:
    """compress.shrink takes a validated ShrinkConfig as well as keywords; both run the same stages through the
    runner's loop and write the same bytes (the keywords' run: the shrunk_by_keywords fixture)."""
    from compress.shrink import ShrinkConfig

    path, _ = trained
    keywords_out, by_keywords, _ = shrunk_by_keywords
    config = ShrinkConfig(model=SPEC, checkpoint=str(path), num_classes=10, prune=0.3, bits=3, recover=True, recover_steps=2, **FAST)
    by_config = compress.shrink(config, out=tmp_path / "b.safetensors", quiet=True)
    assert [s["name"] for s in by_config["stages"]] == ["input", "prune", "recover", "quantize", "export"]
    assert keywords_out.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert by_keywords["file_bytes"] == by_config["file_bytes"]
    with pytest.raises(UserError, match="shrink.prune: .*--prune 2"):
        ShrinkConfig.from_options(model=SPEC, num_classes=10, prune=2)


def test_a_model_without_prunable_channels_is_quantized_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    builder = tmp_path / "tiny.py"
    builder.write_text("import torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self, n):\n"
                       "        super().__init__()\n        self.conv = nn.Conv2d(3, n, 3)\n\n"
                       "    def forward(self, x):\n        return self.conv(x).mean((2, 3))\n\n"
                       "def build(num_classes):\n    return Net(num_classes)\n")
    result = shrink(None, f"file:{builder}:build", tmp_path / "o.safetensors", 10, prune=0.3, bits=4, method="rtn",
                    calib_samples=4, batch_size=4)
    captured = capsys.readouterr()
    assert "no channel can be pruned" in captured.err and "quantizing only" in captured.err
    assert [s["name"] for s in result["stages"]] == ["input", "quantize", "export"]
    assert (tmp_path / "o.safetensors").is_file()


def test_shrink_gives_jlcm_its_few_images_ridge_unless_the_user_sets_one() -> None:
    from compress.shrink.config import SHRINK_JLCM_DEFAULTS, ShrinkConfig
    from compress.shrink.run import build_recipe

    ref = {"source": "digits", "split": "calib"}

    def options(**kwargs: object) -> dict:
        return dict(build_recipe(ShrinkConfig(model="compress:digits-cnn", num_classes=10, **kwargs), 32, ref)
                    .stages[-1].config.options)

    assert options()["damp"] == SHRINK_JLCM_DEFAULTS["damp"] == 1.0
    assert options()["underdetermined_margin"] == SHRINK_JLCM_DEFAULTS["underdetermined_margin"] == 1
    assert options()["scale_underdetermined_steps"] is SHRINK_JLCM_DEFAULTS["scale_underdetermined_steps"] is True
    assert "min_bits" not in options() and options(quant_options={"min_bits": 2})["min_bits"] == 2
    assert options(quant_options={"damp": 0.01})["damp"] == 0.01
    assert options(quant_options={"underdetermined_margin": None})["underdetermined_margin"] is None
    assert "damp" not in options(method="rtn")
