"""Registry of data sources: a name maps to a factory `(split, [root], **options) -> Dataset`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch.utils.data import Dataset

from calib.errors import DataError
from compress.registry import Registry, did_you_mean

SPLITS = ("train", "val", "calib")

_SOURCES: Registry[Callable[..., Dataset]] = Registry("data source", error=DataError, duplicate_error=DataError)
F = TypeVar("F", bound=Callable[..., Dataset])


def register_source(name: str) -> Callable[[F], F]:
    """Register a dataset factory under `name`; its keyword parameters become the source's options."""

    def decorator(factory: F) -> F:
        params = inspect.signature(factory).parameters
        if "split" not in params:
            raise DataError(f"data source '{name}': factory {factory.__qualname__} must take a 'split' argument")
        _SOURCES.add(name, factory)
        return factory

    return decorator


def list_sources() -> list[str]:
    """Names of every registered data source, sorted."""
    return _SOURCES.names()


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
    return _SOURCES.lookup(source)
