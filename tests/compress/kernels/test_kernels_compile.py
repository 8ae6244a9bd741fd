"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU, without register spills.

Runs `compress.kernels.compile_check` in a fresh process (TRITON_INTERPRET must be off there: the interpreter
replaces compilation, and this session's conftest turns it on). Numerics are the interpreter tests' job.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def _nvidia_tools() -> bool:
    spec = importlib.util.find_spec("triton")
    root = Path(spec.origin).parent / "backends" / "nvidia" / "bin" if spec and spec.origin else None
    return bool(root and (root / "ptxas").exists() and (root / "cuobjdump").exists())


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools(), reason="triton without its bundled ptxas / cuobjdump")
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "compress.kernels.compile_check", "--cases", "smoke"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| dequantize") or line.startswith("| linear")]
    assert len(rows) == 6, done.stdout
    assert "largest spill: 0 bytes" in done.stdout, done.stdout
