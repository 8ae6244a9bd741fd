"""compress: recipe-driven compression of PyTorch detection and classification models."""
from __future__ import annotations

__version__ = "0.1.0"

from compress.artifact import ArtifactError, load
from compress.errors import RecipeError, UserError
from compress.recipe import Recipe, load_recipe

__all__ = ["ArtifactError", "Recipe", "RecipeError", "UserError", "load", "load_recipe", "quantize", "run",
           "__version__"]


def run(recipe: Recipe | str, out: str, resume: bool = False, overrides: list[str] | None = None) -> dict:
    """Run a recipe (object or YAML path) into the run directory `out`; returns the report."""
    from compress.pipeline import run as run_pipeline

    inputs = []
    if not isinstance(recipe, Recipe):
        inputs.append(recipe)
        recipe = load_recipe(recipe, overrides)
    return run_pipeline(recipe, out, resume=resume, inputs=inputs)


def quantize(model, calib_batches, method: str = "jlcm", bits: float | None = None, **options):
    """Quantize any nn.Module's conv/linear weights with codebooks (see compress.quant.quantize)."""
    from compress.quant import quantize as quantize_model

    return quantize_model(model, calib_batches, method=method, bits=bits, **options)
