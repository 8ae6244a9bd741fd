"""The base of every validated config (recipe sections, stage and method options) and its error formatting.

Algorithm packages build their configs on this, never on the recipe, so they stay libraries.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from compress.registry import unknown_choice


class Config(BaseModel):
    """Base of every recipe section: frozen, unknown keys refused with a did-you-mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(unknown_choice("field", key, cls.model_fields))
        return data


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as one line: `where: what (got value)` per problem, joined by '; '."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = "" if isinstance(given, dict) or err["type"] == "missing" else f" (got {given!r})"
        lines.append(f"{loc or 'recipe'}: {msg}{shown}")
    return "; ".join(lines)
