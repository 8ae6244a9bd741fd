"""Built-in stages are listed explicitly; users add their own with register_stage."""
from __future__ import annotations

import pytest

from compress.config import Config
from compress.errors import RecipeError
from compress.recipe import parse_recipe
from compress.stages import BUILTIN_STAGES, STAGES, register_stage


def test_builtin_stages_are_listed_once() -> None:
    names = [spec.name for spec in BUILTIN_STAGES]
    assert sorted(names) == sorted(set(names))
    assert set(names) <= set(STAGES)
    assert {"finetune", "sparse", "prune", "distill", "quantize", "export", "recover", "evaluate"} == set(names)


def test_a_plugin_stage_is_usable_in_a_recipe_and_names_are_unique() -> None:
    class ScaleConfig(Config):
        factor: float = 1.0

    @register_stage("test-scale", ScaleConfig)
    def scale(model, config, ctx):
        return model

    try:
        recipe = parse_recipe({"name": "p", "model": {"build": "compress:digits-cnn", "num_classes": 10},
                               "task": "classification", "image_size": 32,
                               "data": {"train": {"source": "digits", "split": "train"},
                                        "val": {"source": "digits", "split": "val"}},
                               "stages": [{"test-scale": {"factor": 2.0}}]})
        assert recipe.stages[0].config.factor == 2.0
        with pytest.raises(ValueError, match="stage 'test-scale' is already registered"):
            register_stage("test-scale", ScaleConfig)(scale)
        with pytest.raises(ValueError, match="stage 'prune' is already registered"):
            register_stage("prune", ScaleConfig)(scale)
        with pytest.raises(RecipeError, match="unknown stage 'test-scal'; did you mean 'test-scale'"):
            STAGES.lookup("test-scal")
    finally:
        STAGES.pop("test-scale", None)
