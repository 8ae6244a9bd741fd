from pathlib import Path

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import apply_overrides, load_recipe, parse_recipe


def _data(tiny_recipe_path: Path) -> dict:
    return yaml.safe_load(tiny_recipe_path.read_text())


def test_recipe_loads_and_round_trips(tiny_recipe_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path)
    assert [s.name for s in recipe.stages] == ["finetune", "evaluate", "finetune"]
    assert recipe.stages[0].config.epochs == 1
    again = parse_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict(), "resolved recipe must round-trip"


def test_misspelt_stage_suggests_the_right_one(tiny_recipe_path: Path) -> None:
    data = _data(tiny_recipe_path)
    data["stages"][0] = {"finetun": {"epochs": 1}}
    with pytest.raises(RecipeError, match=r"stages\.0: unknown stage 'finetun'; did you mean 'finetune'\?"):
        parse_recipe(data)


def test_misspelt_field_names_path_and_suggestion(tiny_recipe_path: Path) -> None:
    data = _data(tiny_recipe_path)
    data["stages"][0] = {"finetune": {"epoch": 1}}
    with pytest.raises(RecipeError, match=r"stages\.0\.finetune: unknown field 'epoch'; did you mean 'epochs'\?"):
        parse_recipe(data)
    data = _data(tiny_recipe_path)
    data["modle"] = data.pop("model")
    with pytest.raises(RecipeError, match=r"unknown field 'modle'; did you mean 'model'\?"):
        parse_recipe(data)


def test_bad_value_names_field_and_value(tiny_recipe_path: Path) -> None:
    data = _data(tiny_recipe_path)
    data["data"]["val"]["split"] = "vall"
    with pytest.raises(RecipeError, match=r"data\.val\.split: .*'train', 'val' or 'calib'.*\(got 'vall'\)"):
        parse_recipe(data)


def test_set_overrides_nested_fields(tiny_recipe_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path, ["stages.0.finetune.epochs=3", "seed=7", "train.batch_size=8"])
    assert recipe.stages[0].config.epochs == 3 and recipe.seed == 7 and recipe.train.batch_size == 8
    with pytest.raises(RecipeError, match="not an index"):
        apply_overrides(_data(tiny_recipe_path), ["stages.9.finetune.epochs=3"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides(_data(tiny_recipe_path), ["seed"])
    with pytest.raises(RecipeError, match="unknown field 'epochz'"):
        load_recipe(tiny_recipe_path, ["stages.0.finetune.epochz=3"])


def test_configs_are_frozen(tiny_recipe_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path)
    with pytest.raises(Exception):
        recipe.stages[0].config.epochs = 5


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("name", ["digits-cls", "digits-yolo"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / f"{name}.yaml")
    assert recipe.stages[0].name == "finetune", "the baseline comes first"
    # digits-yolo recovers by fine-tuning: it won the pre-registered distillation test (docs/BENCHMARKS.md, issue 14)
    recovery = {"digits-cls": "distill", "digits-yolo": "finetune"}[name]
    assert [s.name for s in recipe.stages][1:] == ["sparse", "prune", recovery, "quantize", "export"]


def test_sparse_and_prune_must_share_their_scope(tiny_recipe_path: Path) -> None:
    data = _data(tiny_recipe_path)
    data["stages"] = [{"sparse": {"epochs": 1, "ignore": ["head"]}}, {"prune": {"target": {"params": 0.5}}}]
    with pytest.raises(RecipeError, match=r"stages\.0\.sparse\.ignore and stages\.1\.prune\.ignore differ"):
        parse_recipe(data)
    data["stages"] = [{"distill": {"epochs": 1}}]
    with pytest.raises(RecipeError, match="no prune stage comes before it"):
        parse_recipe(data)
