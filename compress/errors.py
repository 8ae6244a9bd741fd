"""Errors a user can fix: the CLI prints their message in one line and exits with code 2."""
from __future__ import annotations

from compress.registry import did_you_mean, unknown_choice  # noqa: F401  (re-exported: errors name choices)


class UserError(ValueError):
    """Bad input from the user (recipe, path, option); the message says what and how to fix it."""


class RecipeError(UserError):
    """A recipe (or a --set override) breaks a rule of the schema."""


class RunDirError(UserError):
    """The run directory is in a state that the requested command cannot use."""


class PruneError(UserError):
    """A model (or one of its layers) that cannot be pruned as asked, or a shape manifest that does not fit it;
    the message names the layer."""
