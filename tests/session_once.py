"""Work done once per test session, whichever pytest-xdist worker asks first: a subprocess whose start-up costs
seconds of CPU (torch, the data, torch-pruning) and whose result several tests check."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def session_folder(factory: pytest.TempPathFactory) -> Path:
    """This test session's temporary folder, above every pytest-xdist worker's own."""
    return factory.getbasetemp().parent


def once_per_session(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict[str, Any]]
                     ) -> dict[str, Any]:
    """`make(folder)` (a JSON-able dict) once for the session: under xdist the first worker runs it in a folder
    every worker sees, holding a file lock, and the others wait for it and read its result."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return json.loads(json.dumps(make(factory.mktemp(name))))
    from filelock import FileLock

    session = session_folder(factory)
    folder, result = session / name, session / f"{name}.json"
    with FileLock(str(session / f"{name}.lock")):
        if not result.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            result.write_text(json.dumps(make(folder)))
    return json.loads(result.read_text())
