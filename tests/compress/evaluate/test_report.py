import re
import shutil
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


def test_layers_are_listed_in_model_order_with_bits_and_sensitivity(run_dir: Path) -> None:
    from compress.evaluate.report import layer_table, read_run
    from compress.models import build_model

    rows = layer_table(run_dir, read_run(run_dir)["stages"])
    order = [name for name, _ in build_model("compress:digits-cnn", num_classes=10).named_modules()]
    names = [r["layer"] for r in rows]
    assert names == sorted(names, key=order.index), "model order, not alphabetical"
    assert names[0].startswith("stem") and names[-1] == "head"
    assert all({"bits", "kept", "sensitivity"} <= set(r) for r in rows)
    page = write_report(run_dir).read_text()
    assert page.index("stem.0") < page.index("stage1.") < page.index(">head<")


def test_accuracy_plot_stages_as_arrows_in_run_order_labels_apart() -> None:
    from compress.evaluate.plotting import label_overlaps, pyplot
    from compress.evaluate.report import accuracy_figure

    def stage(name: str, size: int, top1: float) -> dict:
        return {"name": name, "size_bytes": size, "metrics": {"top1": top1}, "params": 1, "macs": 1, "seconds": 1.0,
                "bits_per_weight": 32.0}

    # finetune and sparse share a point; prune drops, distill recovers at the same size, then smaller
    report = {"task": "classification", "stages": [
        stage("finetune", 498_000, 0.994), stage("sparse", 498_000, 0.994), stage("prune", 199_000, 0.23),
        stage("distill", 199_000, 0.997), stage("quantize", 14_500, 0.994), stage("export", 24_500, 0.994)]}
    fig, labels = accuracy_figure([("digits-cls", report)])
    ax = fig.axes[0]
    arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None and not a.get_text()]
    assert len(arrows) == 4, "one arrow between consecutive points (finetune and sparse are one point)"
    assert [a.xy for a in arrows] == [(199_000, 0.23), (199_000, 0.997), (14_500, 0.994), (24_500, 0.994)], "run order"
    assert [t.get_text() for t in labels] == ["1. finetune > sparse", "2. prune", "3. distill", "4. quantize",
                                              "5. export"]
    assert label_overlaps(fig, labels + ax.get_xticklabels()) == []
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(ticks) <= 6 and all(t.endswith(("KB", "MB")) for t in ticks), ticks
    pyplot().close(fig)


def test_report_of_several_runs_side_by_side_and_of_a_sweep(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import json

    from compress.cli import main

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    out = tmp_path / "both.html"
    assert main(["report", str(run_dir), str(other), "-o", str(out)]) == 0
    page = out.read_text()
    assert f"tiny-cls ({run_dir.name})" in page and "tiny-cls (other)" in page
    assert page.count('class="side"') == 1 and page.count("<section>") == 2
    assert page.count("data:image/png;base64,") == 1

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "model": "m", "metric": "top1", "tolerance": 1.0, "original": {"metric": 0.9, "size_bytes": 1000},
        "points": [{"id": "a", "method": "rtn", "bits": 4, "prune": 0, "status": "done", "file_bytes": 300,
                    "params": 100, "bits_per_param": 24.0, "metric": 0.89, "seconds": 1.0}]}))
    capsys.readouterr()
    assert main(["report", str(sweep_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep_dir / "report.html")
    assert "rtn 4b" in (sweep_dir / "report.html").read_text()
