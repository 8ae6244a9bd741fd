"""`compress sweep`: the grid, skipped settings, caching and resuming, the sweep.json and report, bad arguments."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main
from compress.errors import UserError
from compress.sweep import SweepConfig, run_sweep

BASE = dict(model="compress:digits-cnn", checkpoint=None, num_classes=10, data="digits:val", calib="digits",
            calib_samples=16, recover_steps=0, batch_size=16)


def test_grid_order_and_invalid_settings_are_skipped_with_the_reason() -> None:
    config = SweepConfig.from_options(**BASE, bits=(2, 2.5, 4), prune=(0, 0.3), methods=("jlcm", "rtn", "nf4"))
    grid = config.grid()
    assert len(grid) == 2 * 3 * 3
    assert [g[:3] for g in grid[:3]] == [("jlcm", 2, 0), ("rtn", 2, 0), ("nf4", 2, 0)]
    status = {(m, b, p): (s, r) for m, b, p, s, r in grid}
    assert status["jlcm", 2.5, 0.3][0] == "todo", "jlcm takes an average"
    assert status["rtn", 2.5, 0][0] == "skipped" and "whole bits" in status["rtn", 2.5, 0][1]
    assert status["nf4", 2, 0][0] == "skipped" and "nf4 is 4 bits" in status["nf4", 2, 0][1]
    assert status["nf4", 4, 0.3][0] == "todo"


@pytest.mark.parametrize("options, message", [
    ({"methods": ("jlcm", "rnt")}, "unknown quantization method 'rnt'"),
    ({"bits": (2, 12)}, "--bits: 12 is out of range"),
    ({"bits": (0.5,)}, "--bits: 0.5 is out of range"),
    ({"prune": (0, 1.0)}, "--prune: 1 is out of range"),
    ({"bits": ()}, "empty grid: give at least one value of --bits"),
    ({"methods": ()}, "empty grid: give at least one value of --methods"),
    ({"methods": ("nf4",), "bits": (2, 3)}, "empty grid: no (method, bits) pair can run (nf4 is 4 bits"),
    ({"data": "digits"}, "--data: 'digits': write SOURCE:SPLIT"),
])
def test_bad_settings_are_one_user_error(options: dict, message: str) -> None:
    settings = {**BASE, "bits": (2, 3), **options}
    with pytest.raises(UserError) as info:
        SweepConfig.from_options(**settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--bits", "2", "--methods", "jlcm", "foo"], "unknown quantization method 'foo'"),
    (["--bits", "2", "9"], "--bits: 9 is out of range"),
    (["--bits", "x"], "--bits 'x': not a number"),
    (["--bits"], "empty grid: give at least one value of --bits"),
    (["--bits", "2", "3", "--methods", "nf4"], "empty grid: no (method, bits) pair can run"),
    (["--bits", "2", "--prune", "0", "1.5"], "--prune: 1.5 is out of range"),
])
def test_cli_bad_arguments_one_line_exit_2(args: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    code = main(["sweep", "none", "--model", "compress:digits-cnn", "--data", "digits:val", "--num-classes", "10",
                 "--task", "classification", "-o", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "s").exists(), "nothing ran"


def test_a_folder_of_images_is_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images").mkdir()
    code = main(["sweep", "none", "--model", "compress:digits-cnn", "--data", str(tmp_path / "images"),
                 "--bits", "4", "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "a folder of images" in err and "SOURCE:SPLIT" in err and "\n" not in err.strip()


def test_unlabelled_sweep_of_a_model_confident_on_nothing_ranks_by_agreement(tmp_path: Path, one_thread: None) -> None:
    # a random init answers every photo with about 0.11 probability: no confident crop to count
    config = SweepConfig.from_options(**{**BASE, "data": "photos:val"}, bits=(8,), methods=("rtn",))
    sweep = run_sweep(config, tmp_path / "s", quiet=True)
    assert sweep["metric"] == "agreement" and sweep["original"]["metric"] == 1.0
    point = sweep["points"][0]
    assert point["metrics"]["confident_images"] == 0 and point["metric"] == point["metrics"]["agreement"]
    assert 0 <= point["metric"] <= 1  # a number to draw (near-tied logits: 8 bits may still move every answer)
    assert (tmp_path / "s" / "report.html").is_file()


@pytest.mark.slow
def test_unlabelled_data_sweeps_agreement_with_the_original(tmp_path: Path, one_thread: None) -> None:
    import torch

    from calib import get_dataset
    from compress.models import build_model

    torch.manual_seed(0)
    net = build_model("compress:digits-cnn", num_classes=10)
    digits = get_dataset("digits", "train")  # 40 steps: features that depend on the image, confident answers
    xs = torch.stack([digits[i][0] for i in range(512)])
    ys = torch.tensor([int(digits[i][1]) for i in range(512)])
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(40):
        pick = torch.randint(0, 512, (64,))
        loss = torch.nn.functional.cross_entropy(net(xs[pick]), ys[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = tmp_path / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    options = {**BASE, "checkpoint": str(checkpoint), "data": "photos:val"}
    config = SweepConfig.from_options(**options, bits=(2, 8), methods=("rtn",))
    sweep = run_sweep(config, tmp_path / "s", quiet=True)
    assert sweep["metric"] == "confident_agreement"
    assert sweep["original"]["metric"] == 1.0 and sweep["original"]["metrics"]["kl"] < 1e-6
    assert (tmp_path / "s" / "report.html").is_file()
    points = {p["id"]: p for p in sweep["points"]}
    low, high = points["rtn-b2-p0"], points["rtn-b8-p0"]
    assert high["metrics"]["confident_images"] >= 20, "the test needs confident crops to mean anything"
    assert high["metric"] >= 0.9 and high["metrics"]["kl"] < low["metrics"]["kl"]
    assert low["metric"] < high["metric"]
    # resumed with one more point: the two cached, the new one compared with the original built again
    again = run_sweep(SweepConfig.from_options(**options, bits=(2, 4, 8), methods=("rtn",)), tmp_path / "s", quiet=True)
    metrics = {p["id"]: p["metric"] for p in again["points"]}
    assert metrics["rtn-b2-p0"] == low["metric"] and metrics["rtn-b8-p0"] == high["metric"]
    assert 0 <= metrics["rtn-b4-p0"] <= 1


@pytest.mark.slow
def test_sweep_writes_points_report_and_resumes(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    import compress.shrink.run as shrink_run

    calls: list[tuple[str, float, float]] = []
    real = shrink_run.run_shrink

    def counting(config, out, **kw):
        calls.append((config.method, config.bits, config.prune))
        return real(config, out, **kw)

    monkeypatch.setattr(shrink_run, "run_shrink", counting)
    out = tmp_path / "sweep"
    config = SweepConfig.from_options(**BASE, bits=(2.5, 4), prune=(0, 0.3), methods=("rtn", "nf4"))
    sweep = run_sweep(config, out)
    printed = capsys.readouterr().out
    assert sorted(calls) == [("nf4", 4, 0), ("nf4", 4, 0.3), ("rtn", 4, 0), ("rtn", 4, 0.3)]
    assert "[8/8]" in printed and "0 left" in printed and "s/point" in printed, "progress: done / left, pace"

    data = json.loads((out / "sweep.json").read_text())
    assert data["metric"] == "top1" and data["original"]["size_bytes"] == 498_488 and data["original"]["params"] == 123_898
    statuses = {p["id"]: p["status"] for p in data["points"]}
    assert statuses == {"rtn-b2.5-p0": "skipped", "nf4-b2.5-p0": "skipped", "rtn-b4-p0": "done", "nf4-b4-p0": "done",
                        "rtn-b2.5-p0.3": "skipped", "nf4-b2.5-p0.3": "skipped", "rtn-b4-p0.3": "done",
                        "nf4-b4-p0.3": "done"}
    done = [p for p in data["points"] if p["status"] == "done"]
    for p in done:
        artifact = Path(p["artifact"])
        assert artifact.stat().st_size == p["file_bytes"]
        assert p["bits_per_param"] == pytest.approx(p["file_bytes"] * 8 / p["params"], rel=1e-3)
        assert 0 <= p["metric"] <= 1 and p["seconds"] > 0
    pruned = next(p for p in done if p["id"] == "rtn-b4-p0.3")
    assert pruned["params"] < next(p for p in done if p["id"] == "rtn-b4-p0")["params"]
    # Pareto flags: no done point is both at most as large and strictly better than a flagged one
    for p in done:
        beaten = any(q["file_bytes"] <= p["file_bytes"] and q["metric"] >= p["metric"] and
                     (q["file_bytes"], q["metric"]) != (p["file_bytes"], p["metric"]) for q in done)
        assert p["pareto"] == (not beaten)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and (out / "frontier.png").stat().st_size > 10_000
    assert "whole bits" in page, "skipped points keep their reason"
    assert sweep["report"] == str(out / "report.html")

    # rerun: nothing redone; a point killed before its entry was written is redone alone
    calls.clear()
    (out / "points" / "nf4-b4-p0.3.json").unlink()
    again = run_sweep(config, out)
    assert calls == [("nf4", 4, 0.3)]
    assert "cached" in capsys.readouterr().out
    assert [p.get("metric") for p in again["points"]] == [p.get("metric") for p in data["points"]]

    # a changed setting redoes the points it changes
    calls.clear()
    run_sweep(SweepConfig.from_options(**{**BASE, "recover_steps": 1}, bits=(4,), prune=(0, 0.3), methods=("rtn",)), out)
    assert calls == [("rtn", 4, 0.3)], "recover steps only change pruned points"

    # another version of compress redoes every point (its code decides the results)
    import compress.sweep.run as sweep_run

    calls.clear()
    monkeypatch.setattr(sweep_run, "__version__", "0.0.0-other")
    run_sweep(SweepConfig.from_options(**{**BASE, "recover_steps": 1}, bits=(4,), prune=(0, 0.3), methods=("rtn",)), out)
    assert calls == [("rtn", 4, 0), ("rtn", 4, 0.3)]


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_without_redoing_finished_points(tmp_path: Path) -> None:
    """The real thing: `compress sweep` killed with SIGKILL after its first points, then run again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "compress", "sweep", "none", "--model", "compress:digits-cnn", "--data",
               "digits:val", "--calib", "digits", "--calib-samples", "16", "--methods", "rtn", "kmeans", "--bits",
               "2", "4", "-o", str(out)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if len(list((out / "points").glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the sweep ended before it could be killed:\n" + first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    finished = {p.stem for p in (out / "points").glob("*.json")}
    assert 2 <= len(finished) < 4
    before = {name: (out / "points" / f"{name}.safetensors").stat().st_mtime_ns for name in finished}

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    cached = [line for line in second.stdout.splitlines() if "), cached;" in line]
    assert len(cached) == len(finished), second.stdout
    for name, mtime in before.items():
        assert (out / "points" / f"{name}.safetensors").stat().st_mtime_ns == mtime, f"{name} was redone"
    data = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in data["points"]] == ["done"] * 4


def test_a_recipe_gives_the_base_of_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from compress.sweep.config import options_from_recipe

    root = Path(__file__).resolve().parents[3]
    assert options_from_recipe(str(root / "recipes" / "digits-cls.yaml")) == {
        "model": "compress:digits-cnn", "num_classes": 10, "task": "classification", "calib": "digits:calib",
        "data": "digits:val"}
    assert main(["sweep", "none", "--bits", "4", "-o", str(tmp_path / "s")]) == 2
    assert "--model is needed (or --recipe" in capsys.readouterr().err
