import subprocess
import sys
from pathlib import Path

import pytest

from compress.cli import main


def test_misspelt_stage_exits_2_with_one_line_and_no_traceback(tiny_recipe_path: Path, tmp_path: Path) -> None:
    tiny_recipe_path.write_text(tiny_recipe_path.read_text().replace("- evaluate:", "- evaluat:"))
    done = subprocess.run([sys.executable, "-m", "compress", "run", str(tiny_recipe_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown stage 'evaluat'; did you mean 'evaluate'?" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r").exists(), "no work may start on a bad recipe"


def test_bad_set_and_missing_recipe_exit_2(tiny_recipe_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "r"), "--set", "stages.0.finetune.lr=-1"]) == 2
    assert "stages.0.finetune.lr" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_inspect_prints_params_and_macs(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "compress:digits-cnn", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "MACs" in out
    assert main(["inspect", "compress:nope"]) == 2


def test_help_shows_examples() -> None:
    done = subprocess.run([sys.executable, "-m", "compress", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Example:" in done.stdout
