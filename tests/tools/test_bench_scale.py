"""tools/bench_scale.py on one tiny model: a result line per (model, setting), the JSON and the plot, resumable."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_bench_scale_times_a_tiny_model_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool's main() runs in this process (its own start-up is not what is tested); each (model, setting) still
    runs in the fresh worker process the tool starts for it."""
    args = ["--out", str(tmp_path), "--models", "timm:mobilenetv3_small_050", "--settings", "4bit", "--samples", "2",
            "--size", "32", "--options", '{"calib_steps": 2, "bit_choices": [2, 4], "float_choice": false}',
            "--timeout", "300"]
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "tools" / "bench_scale.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.chdir(ROOT)  # where a user runs it, as the worker process then does
    assert tool.main(args) == 0, capsys.readouterr().err[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["ok"], lines
    row = lines[0]
    assert row["setting"] == "4bit" and row["params"] > 1e5 and row["seconds"] > 0 and row["peak_rss_mb"] > 0
    assert "learn" in row["phases"] and len(row["load_before"]) == 3
    summary = json.loads((tmp_path / "scale.json").read_text())
    assert summary["machine"]["threads"] == 1 and summary["results"][0]["model"] == "timm:mobilenetv3_small_050"
    assert (tmp_path / "scale.png").stat().st_size > 0
    capsys.readouterr()
    assert tool.main(args) == 0  # the rerun: the pair is done, nothing runs
    again = capsys.readouterr().out
    assert "1 already done" in again and "[1/1]" not in again
