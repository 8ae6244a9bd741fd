"""compress: recipe-driven compression of PyTorch detection and classification models.

The top level is lazy: `import compress` loads nothing heavy, and `compress.load` (the read side,
`compress.format`) imports no stage, training, pruning, timm or plotting code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress._version import __version__
from compress.errors import RecipeError, UserError
from compress.format.artifact import ArtifactError, load

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch.nn as nn

    from compress.quant.registry import QuantConfig
    from compress.recipe import Recipe

__all__ = ["ArtifactError", "Recipe", "RecipeError", "UserError", "load", "load_recipe", "quantize", "run", "shrink",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name == "shrink":  # the package compress.shrink is callable: compress.shrink(...) runs a shrink
        import importlib

        return importlib.import_module("compress.shrink")
    if name in ("Recipe", "load_recipe"):
        from compress import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def run(recipe: Recipe | str, out: str, resume: bool = False, overrides: list[str] | None = None) -> dict:
    """Run a recipe (object or YAML path) into the run directory `out`; returns the report."""
    from compress.pipeline import run as run_pipeline
    from compress.recipe import Recipe, load_recipe

    inputs = []
    if not isinstance(recipe, Recipe):
        inputs.append(recipe)
        recipe = load_recipe(recipe, overrides)
    return run_pipeline(recipe, out, resume=resume, inputs=inputs)


def quantize(model: nn.Module, calib_batches: Iterable[Any], method: str | QuantConfig = "jlcm",
             bits: float | None = None, **options: Any) -> nn.Module:
    """Quantize any nn.Module's weights with codebooks, in place (see compress.quant.quantize); `method` is a
    registered name or a method's config object (e.g. `JLCMConfig(bits=3)`)."""
    from compress.quant import quantize as quantize_model

    return quantize_model(model, calib_batches, method=method, bits=bits, **options)

