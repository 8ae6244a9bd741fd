"""Shared fixtures for the calib tests: a private cache and tiny image files written on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from calib import DataError


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh COMPRESS_CACHE per test, so no test reads another's (or the user's) generated data."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("COMPRESS_CACHE", str(path))
    return path


def write_image(path: Path, size: tuple[int, int] = (20, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """Write a small solid-colour image (any PIL format, from the suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def image_file():
    """The write_image helper, as a fixture so test modules need not import conftest."""
    return write_image


def expect_data_error(call, *parts: object) -> str:
    """Run `call`, which must raise DataError whose message contains every one of `parts`; return it."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for part in parts:
        assert str(part) in message, f"{str(part)!r} missing from the error: {message}"
    return message


@pytest.fixture
def data_error():
    """The expect_data_error helper, as a fixture."""
    return expect_data_error
