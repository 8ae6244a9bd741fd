"""tools/zoo.py on a few small models of different families: shrink, reload and forward each, resumably."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# two families keep the runner's test short (each model is a fresh process; depthwise + squeeze-excite models are
# pruned and reloaded in tests/compress/prune/test_models.py); tools/zoo.py's full list is in docs/ZOO.md
MODELS = ["torchvision:shufflenet_v2_x0_5",  # channel shuffle, split / concat
          "timm:test_vit"]  # a ViT (timm's 0.3 M-parameter test VisionTransformer: heads, LayerNorm, MLP) in seconds


@pytest.mark.slow
@pytest.mark.integration
def test_zoo_runner_round_trips_a_few_families_and_resumes(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "zoo.py"), "--out", str(tmp_path), "--method", "rtn", "--size", "32",
           "--samples", "2", "--timeout", "300", "--models", *MODELS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in (tmp_path / "zoo.jsonl").read_text().splitlines()]
    assert [r["model"] for r in results] == MODELS
    for r in results:
        assert r["ok"], (r["model"], r.get("step"), r.get("reason"))
        assert 0.28 <= r["removed"] <= 0.32, (r["model"], r["removed"])
    table = (tmp_path / "zoo.md").read_text()
    assert "2 of 2 pass" in table and "shufflenet_v2_x0_5" in table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "2 already done" in again.stdout and "[1/2]" not in again.stdout
