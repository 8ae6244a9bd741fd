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
    from compress.recipe import Recipe

__all__ = ["ArtifactError", "Recipe", "RecipeError", "UserError", "load", "load_recipe", "quantize", "run", "shrink",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Recipe", "load_recipe"):
        from compress import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def run(recipe: Recipe | str, out: str, resume: bool = False, overrides: list[str] | None = None) -> dict:
    """Run a recipe (object or YAML path) into the run directory `out`; returns the report."""
    from compress.pipeline import run as run_pipeline
    from compress.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run_pipeline(recipe, out, resume=resume)


def quantize(model, calib_batches, method="jlcm", bits=None, **options):
    """Quantize any nn.Module's conv/linear weights with codebooks (see compress.quant.quantize)."""
    from compress.quant import quantize as quantize_model

    return quantize_model(model, calib_batches, method=method, bits=bits, **options)


def shrink(*args, **kwargs):
    """One-shot prune -> label-free recovery -> quantization -> artifact of a checkpoint (see compress.shrink)."""
    from compress.shrink import shrink as run_shrink

    return run_shrink(*args, **kwargs)
