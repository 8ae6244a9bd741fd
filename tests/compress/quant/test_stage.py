import json
from pathlib import Path

import pytest
import torch
import yaml

import compress.quant as cq
from compress.format.checkpoint import load_model, save_model
from compress.errors import RecipeError
from compress.evaluate.size import storage_bytes
from compress.models import build_model
from compress.recipe import parse_recipe


def _recipe(tiny_recipe_path: Path, stage: dict) -> dict:
    data = yaml.safe_load(tiny_recipe_path.read_text())
    data["stages"] = [{"finetune": {"epochs": 1, "lr": 3.0e-3, "warmup_epochs": 0}}, {"quantize": stage}]
    return data


def test_stage_options_are_validated_flat_and_round_trip(tiny_recipe_path: Path) -> None:
    recipe = parse_recipe(_recipe(tiny_recipe_path, {"method": "jlcm", "bits": 2.0, "groups": 4, "calib_steps": 5}))
    config = recipe.stages[1].config
    assert config.method == "jlcm" and config.options == {"bits": 2.0, "groups": 4, "calib_steps": 5}
    assert recipe.to_dict()["stages"][1] == {"quantize": {"method": "jlcm", "batch_size": 32, "bits": 2.0, "groups": 4,
                                                           "calib_steps": 5}}
    assert parse_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()
    with pytest.raises(RecipeError, match=r"stages\.1\.quantize: unknown field 'calib_step'; did you mean 'calib_steps'\?"):
        parse_recipe(_recipe(tiny_recipe_path, {"method": "jlcm", "calib_step": 5}))
    with pytest.raises(RecipeError, match=r"unknown field 'groups'.*of quantize method 'kmeans'"):
        parse_recipe(_recipe(tiny_recipe_path, {"method": "kmeans", "groups": 4}))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("compress:digits-cnn", num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 32, 32, generator=gen) for _ in range(2)]
    cq.quantize(model, batches, method="jlcm", bits=2.5, calib_steps=5, groups=4, sensitivity_samples=4,
                bit_choices=(2, 3, 4))
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"build": "compress:digits-cnn", "num_classes": 10, "options": {}},
               {"quantization": json.loads(json.dumps(model.quantization_plan))})
    loaded, meta = load_model(path)
    loaded.eval()
    x = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert storage_bytes(loaded) == storage_bytes(model)
    assert set(cq.quantized_modules(loaded)) == {e["name"] for e in meta["quantization"]["layers"]}


@pytest.mark.integration
def test_pipeline_stage_records_the_plan(tiny_recipe_path: Path, tmp_path: Path) -> None:
    from compress.pipeline import run

    recipe = parse_recipe(_recipe(tiny_recipe_path, {"method": "jlcm", "bits": 3.0, "calib_steps": 5,
                                                     "sensitivity_samples": 8, "groups": 4}))
    report = run(recipe, tmp_path / "run")
    entry = report["stages"][-1]
    assert entry["name"] == "quantize"
    assert entry["metrics"]["quant_bits_per_weight"] <= 3.0 + 1e-6, "the target is met by what is quantized"
    plan = json.loads((tmp_path / "run" / "stages" / "02-quantize" / "quantization_plan.json").read_text())
    assert plan["layers"] and all("bits" in e and "layout" in e for e in plan["layers"])
    loaded, meta = load_model(tmp_path / "run" / entry["checkpoint"])
    assert meta["quantization"]["summary"] == {k: v for k, v in plan["summary"].items() if k != "seconds"}
    assert "seconds" in plan["summary"], "timings stay in the stage's plan file, not in the checkpoint"
