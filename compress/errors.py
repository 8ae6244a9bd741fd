"""Errors a user can fix: the CLI prints their message in one line and exits with code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (recipe, path, option); the message says what and how to fix it."""


class RecipeError(UserError):
    """A recipe (or a --set override) breaks a rule of the schema."""


class RunDirError(UserError):
    """The run directory is in a state that the requested command cannot use."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """Message for a value outside a known set: names it, suggests the closest, lists all."""
    choices = sorted(str(c) for c in choices)
    return f"unknown {kind} '{value}'{did_you_mean(value, choices)} (known: {', '.join(choices)})"
