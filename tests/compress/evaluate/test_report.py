import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compress.evaluate.report import write_report
from compress.pipeline import run
from compress.recipe import load_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "tiny.yaml"
    from tests.conftest import TINY_CLS_RECIPE

    path.write_text(TINY_CLS_RECIPE)
    out = path.parent / "run"
    run(load_recipe(path, ["stages.0.finetune.epochs=1", "stages.2.finetune.epochs=0"]), out)
    return out


def test_report_is_self_contained(run_dir: Path) -> None:
    html_path = write_report(run_dir)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 3, "plots are embedded"
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "no external links or scripts"
    assert "<script" not in page
    for name in ("accuracy_vs_size.png", "time_per_stage.png", "layers.png"):
        assert (run_dir / name).stat().st_size > 1000, f"{name} written beside the report"
    assert "stage3.conv2.0" in page, "per-layer table lists the layers"


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed")
    html_path = write_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, "a non-trivial screenshot"
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert len(set(image.getdata())) > 16, "the page rendered more than a blank canvas"
