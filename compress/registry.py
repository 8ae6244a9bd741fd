"""One small registry for everything users plug in: stages, models, data sources, tasks, quantizers, restorers."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F")


def did_you_mean(value: str, choices) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice(kind: str, value: str, choices) -> str:
    """Message for a value outside a known set: names it, suggests the closest, lists all."""
    choices = sorted(str(c) for c in choices)
    return f"unknown {kind} '{value}'{did_you_mean(value, choices)} (known: {', '.join(choices)})"


class Registry(dict, Generic[T]):
    """Name -> entry. A second entry under one name is refused (naming who registered the first); `lookup` of an
    unknown name raises `error` with a did-you-mean and the known names."""

    def __init__(self, kind: str, error: type[Exception] = ValueError,
                 duplicate_error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.kind = kind
        self.error = error
        self.duplicate_error = duplicate_error

    def add(self, name: str, entry: T, owner: object = None) -> T:
        """Register `entry` under `name`; `owner` (default: the entry) names who did it in the duplicate error."""
        if name in self:
            first = getattr(self[name], "fn", self[name])
            by = getattr(first, "__module__", None)
            raise self.duplicate_error(f"{self.kind} '{name}' is already registered" + (f" (by {by})" if by else ""))
        self[name] = entry
        return entry

    def register(self, name: str, make: Callable[[F], T] | None = None) -> Callable[[F], F]:
        """Decorator: register `make(fn)` (or `fn` itself) under `name` and give `fn` back unchanged."""

        def wrap(fn: F) -> F:
            self.add(name, make(fn) if make is not None else fn)
            return fn

        return wrap

    def lookup(self, name: str) -> T:
        if name not in self:
            raise self.error(unknown_choice(self.kind, name, self))
        return self[name]

    def names(self) -> list[str]:
        return sorted(self)
