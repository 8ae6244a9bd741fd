"""Registry of data sources: a name maps to a factory `(split, [root], **options) -> Dataset`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from torch.utils.data import Dataset

from calib.errors import DataError

SPLITS = ("train", "val", "calib")

_SOURCES: dict[str, Callable[..., Dataset]] = {}
F = TypeVar("F", bound=Callable[..., Dataset])


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def register_source(name: str) -> Callable[[F], F]:
    """Register a dataset factory under `name`; its keyword parameters become the source's options."""

    def decorator(factory: F) -> F:
        if name in _SOURCES:
            raise DataError(f"data source '{name}' is already registered (by {_SOURCES[name].__module__})")
        params = inspect.signature(factory).parameters
        if "split" not in params:
            raise DataError(f"data source '{name}': factory {factory.__qualname__} must take a 'split' argument")
        _SOURCES[name] = factory
        return factory

    return decorator


def list_sources() -> list[str]:
    """Names of every registered data source, sorted."""
    return sorted(_SOURCES)


def source_options(source: str) -> list[str]:
    """Option names a source accepts (its factory's keyword parameters besides split and root)."""
    params = inspect.signature(_lookup(source)).parameters
    return [p for p in params if p not in ("split", "root")]


def get_dataset(source: str, split: str, root: str | Path | None = None, **options) -> Dataset:
    """Build the `split` ('train', 'val' or 'calib') of a registered data source."""
    factory = _lookup(source)
    if split not in SPLITS:
        raise DataError(
            f"source '{source}': unknown split '{split}'; expected one of {', '.join(SPLITS)}"
            + did_you_mean(str(split), SPLITS)
        )
    known = source_options(source)
    for option in options:
        if option not in known:
            raise DataError(
                f"source '{source}': unknown option '{option}'; known options: {', '.join(known) or '(none)'}"
                + did_you_mean(option, known)
            )
    takes_root = "root" in inspect.signature(factory).parameters
    if takes_root:
        if root is None:
            raise DataError(f"source '{source}' reads files: pass root=<folder> (recipe data root, --root on the command line; split '{split}')")
        return factory(split=split, root=root, **options)
    if root is not None:
        raise DataError(f"source '{source}' is generated and takes no root (got root={str(root)!r})")
    return factory(split=split, **options)


def _lookup(source: str) -> Callable[..., Dataset]:
    if source not in _SOURCES:
        raise DataError(
            f"unknown data source '{source}'; known sources: {', '.join(list_sources())}"
            + did_you_mean(str(source), _SOURCES)
        )
    return _SOURCES[source]
