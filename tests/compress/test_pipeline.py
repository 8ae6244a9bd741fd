import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.format.checkpoint import load_model
from compress.errors import RunDirError
from compress.pipeline import run
from compress.recipe import load_recipe

ENV = {**os.environ, "PYTHONHASHSEED": "0"}


def _stage_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "stages").rglob("*")) if p.is_file()}


def test_run_writes_report_and_checkpoints(tiny_recipe_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = run(load_recipe(tiny_recipe_path), out)
    names = [s["name"] for s in report["stages"]]
    assert names == ["finetune", "evaluate", "finetune"], names
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report)), "report.json must match the returned report"
    for entry in report["stages"]:
        assert set(entry) >= {"name", "metrics", "params", "macs", "size_bytes", "bits_per_weight", "seconds"}
        assert 0.0 <= entry["metrics"]["top1"] <= 1.0
        assert entry["bits_per_weight"] == pytest.approx(8 * entry["size_bytes"] / entry["params"], abs=1e-3)
        assert entry["bits_per_weight"] > 32.0, "dense fp32 weights, and the BN statistics count too"
        assert (out / entry["checkpoint"]).is_file()
    assert "calib_top1" in report["stages"][1]["metrics"], "evaluate on calib records its metrics"
    assert (out / "recipe.yaml").is_file() and "finetune epoch 1/1" in (out / "log.txt").read_text()
    model, _ = load_model(out / report["stages"][-1]["checkpoint"])
    assert sum(p.numel() for p in model.parameters()) == report["stages"][-1]["params"]


def test_existing_run_dir_is_refused_without_resume(tiny_recipe_path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path, ["stages.0.finetune.epochs=0", "stages.2.finetune.epochs=0"])
    out = tmp_path / "run"
    run(recipe, out)
    with pytest.raises(RunDirError, match="already holds a finished run; add --resume"):
        run(recipe, out)
    before = _stage_files(out)
    report = run(recipe, out, resume=True)
    assert len(report["stages"]) == 3 and _stage_files(out) == before, "a finished run resumes to a no-op"
    changed = load_recipe(tiny_recipe_path, ["stages.0.finetune.epochs=2", "stages.2.finetune.epochs=0"])
    with pytest.raises(RunDirError, match="config of finished stage 0"):
        run(changed, out, resume=True)


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_then_resume_keeps_finished_stages_byte_identical(tiny_recipe_path: Path, tmp_path: Path) -> None:
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    settings = ["stages.2.finetune.epochs=3", "train.threads=1"]  # one thread: the in-process run adds up alike
    cmd = [sys.executable, "-m", "compress", "run", str(tiny_recipe_path), *(a for s in settings for a in ("--set", s))]
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report_path = killed / "report.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if report_path.exists() and len(json.loads(report_path.read_text())["stages"]) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make the last stage longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = json.loads(report_path.read_text())["stages"]
    assert 1 <= len(finished) < 3
    kept = {k: v for k, v in _stage_files(killed).items() if not Path(k).name.startswith(".")}
    done = subprocess.run([*cmd, "--out", str(killed), "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = _stage_files(killed)
    for name, data in kept.items():
        if any(name.startswith(str(Path(e["checkpoint"]).parent)) for e in finished):
            assert after[name] == data, f"{name} changed on resume"
    assert len(json.loads(report_path.read_text())["stages"]) == 3
    assert not [k for k in after if Path(k).name.startswith(".")], "temp files left behind"
    run(load_recipe(tiny_recipe_path, settings), fresh)  # uninterrupted, in this process (no second start-up)
    resumed_last = load_model(killed / "stages/03-finetune/model.safetensors")[0].state_dict()
    fresh_last = load_model(fresh / "stages/03-finetune/model.safetensors")[0].state_dict()
    assert all((resumed_last[k] == fresh_last[k]).all() for k in fresh_last), "resume must equal an uninterrupted run"


@pytest.mark.integration
@pytest.mark.slow
def test_two_cpu_processes_train_identical_replicas(two_process_runs: dict) -> None:
    """`compress run` of the tiny recipe in both processes of a `torchrun --nproc_per_node 2` launch (shared with
    the sparse sub-gradient test: tests/compress/two_processes.py)."""
    out = two_process_runs["ddp"]
    assert two_process_runs["returncode"] == 0, two_process_runs["stderr"][-3000:]
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log, log
    assert log.count("2 replicas in sync") == 2, log
    assert len(json.loads((out / "report.json").read_text())["stages"]) == 3


def test_skip_carves_a_tuning_split_out_of_train_and_threads_are_set_then_restored(tiny_recipe_path: Path,
                                                                                  tmp_path: Path) -> None:
    import torch

    from compress.errors import UserError
    from compress.pipeline import RunContext, get_task, make_accelerator

    recipe = load_recipe(tiny_recipe_path, ["data.train.skip=100", "data.val.split=train", "data.val.samples=100",
                                            "stages.0.finetune.epochs=0", "stages.2.finetune.epochs=0",
                                            "train.threads=1"])
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, accelerator=make_accelerator(), task=get_task("classification"))
    fit, tune = ctx.dataset("train"), ctx.dataset("val")
    assert list(tune.indices) == list(range(100)) and list(fit.indices)[0] == 100
    assert list(fit.indices) == list(range(100, 228)), "samples counts after skip"
    assert set(fit.indices).isdisjoint(tune.indices)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = run(recipe, tmp_path / "run")
        assert report["torch_threads"] == 1 and torch.get_num_threads() == 2, "the recipe's threads, then restored"
    finally:
        torch.set_num_threads(before)
    too_far = load_recipe(tiny_recipe_path, ["data.train.skip=100000"])
    ctx = RunContext(recipe=too_far, run_dir=tmp_path, accelerator=make_accelerator(), task=get_task("classification"))
    with pytest.raises(UserError, match=r"data\.train\.skip is 100000 but .* has only"):
        ctx.dataset("train")
