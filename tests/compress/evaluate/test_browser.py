"""Both reports opened in headless Chromium as a person would, at desktop and phone width: every plot is
there and decodes, the page logs nothing to the console, the screenshot is more than a blank canvas.
Skipped when Chromium is not installed (CI installs it when it can)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from compress.evaluate.report import write_report

ROOT = Path(__file__).resolve().parents[3]
WIDTHS = {"desktop": 1280, "phone": 390}

pytestmark = pytest.mark.browser


def _tool():
    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "tools" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    module = _tool()
    if module.find_chromium() is None:
        pytest.skip("Chromium is not installed")
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compress.pipeline import run
    from compress.recipe import load_recipe
    from tests.conftest import TINY_CLS_RECIPE

    path = tmp_path_factory.mktemp("browser") / "tiny.yaml"
    path.write_text(TINY_CLS_RECIPE)
    out = path.parent / "run"
    run(load_recipe(path, ["stages.0.finetune.epochs=1", "stages.2.finetune.epochs=0"]), out)
    return out


@pytest.fixture(scope="module")
def sweep_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compress.evaluate.frontier import write_sweep_report
    from tests.compress.evaluate.test_frontier import point, sweep_of

    points = [point(0, "jlcm", 30_800, 0.994, 2, 0.4), point(1, "rtn", 33_800, 0.42, 2, 0.4),
              point(2, "kmeans", 31_700, 0.39, 2, 0.4), point(3, "jlcm", 43_100, 0.994, 2),
              point(4, "rtn", 77_400, 0.992, 4), point(5, "nf4", 82_700, 0.989, 4),
              {"id": "s", "method": "rtn", "bits": 2.5, "prune": 0, "status": "skipped", "reason": "whole bits"}]
    return write_sweep_report(sweep_of(points, 0.9944), tmp_path_factory.mktemp("sweep"))


def check_page(tool, page: Path, plots: list[str], shots: Path) -> None:
    for kind, width in WIDTHS.items():
        shot = shots / f"{page.parent.name}-{kind}.png"
        result = tool.render(page, shot, width=width, height=3000)
        assert result["console"] == [], f"{kind}: console messages {result['console']}"
        found = re.findall(r'data-plot="([^"]+)"', result["dom"])
        assert sorted(found) == sorted(plots), f"{kind}: plots in the page {found}"
        assert "<p class=\"missing\">" not in result["dom"], f"{kind}: a plot did not decode"
        from PIL import Image

        image = Image.open(shot)
        assert image.width == width and image.height > 600, "a full page, trimmed below the content"
        grey = image.convert("L")
        assert len(grey.getcolors(maxcolors=256) or []) > 32, f"{kind}: more than a blank canvas"


def test_run_report_in_chromium(tool, run_dir: Path, tmp_path: Path) -> None:
    page = write_report(run_dir)
    check_page(tool, page, ["accuracy_vs_size.png", "time_per_stage.png", "layers.png"], tmp_path)


def test_sweep_report_in_chromium(tool, sweep_page: Path, tmp_path: Path) -> None:
    check_page(tool, sweep_page, ["frontier.png"], tmp_path)


def test_a_broken_plot_is_caught(tool, sweep_page: Path, tmp_path: Path) -> None:
    """The check fails as it should: a plot that cannot be decoded shows 'plot missing' and logs an error."""
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]{100}", "base64,AAAA", sweep_page.read_text(), count=1))
    result = tool.render(broken, None, width=1280)
    assert any("plot missing: " in m for m in result["console"]), result["console"]
    with pytest.raises(AssertionError, match="console messages"):
        check_page(tool, broken, ["frontier.png"], tmp_path)


def test_the_points_table_sorts_in_the_browser(tool, sweep_page: Path) -> None:
    def column(dom: str, index: int) -> list[str]:
        body = dom.split('<table class="sortable" id="points">', 1)[1].split("</tbody>", 1)[0]
        rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.split("<tbody>", 1)[1], flags=re.S)
        return [re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)[index] for row in rows]

    plain = tool.render(sweep_page, fragment="")["dom"]
    assert column(plain, 0)[:2] == ["jlcm", "rtn"], "as written: the sweep's order"
    by_size = tool.render(sweep_page, fragment="sort=file bytes")
    assert by_size["console"] == []
    sizes = [int(v.replace(",", "")) for v in column(by_size["dom"], 5) if v]
    assert sizes == sorted(sizes) and len(sizes) == 6
    assert column(by_size["dom"], 5)[-1] == "", "points without a size sort last"
    by_metric = tool.render(sweep_page, fragment="sort=-top1")["dom"]
    metrics = [float(v) for v in column(by_metric, 3) if v]
    assert metrics == sorted(metrics, reverse=True)
