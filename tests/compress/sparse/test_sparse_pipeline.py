"""sparse -> prune -> finetune through the runner, and the sub-gradient under two processes."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import compress.prune  # noqa: F401  (registers the prune stage and restorer)
import compress.sparse  # noqa: F401  (registers the sparse stage)
from compress.format.checkpoint import load_model
from compress.pipeline import run
from compress.recipe import load_recipe

STAGES = [{"sparse": {"epochs": 1, "lr": 3.0e-3, "warmup_epochs": 0, "sparsity_rate": 1.0e-2}},
          {"prune": {"target": {"params": 0.5}}},
          {"finetune": {"epochs": 1, "lr": 1.0e-3, "warmup_epochs": 0}}]


def _recipe(tiny_recipe_path: Path, stages: list, samples: int = 128) -> Path:
    data = yaml.safe_load(tiny_recipe_path.read_text())
    data["stages"] = stages
    data["data"]["train"]["samples"] = samples
    data["data"].pop("calib", None)
    path = tiny_recipe_path.with_name(f"recipe-{len(list(tiny_recipe_path.parent.glob('recipe-*')))}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def test_sparse_prune_finetune_run_and_reload(tiny_recipe_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = run(load_recipe(_recipe(tiny_recipe_path, STAGES)), out)
    names = [s["name"] for s in report["stages"]]
    assert names == ["input", "sparse", "prune", "finetune"], names
    base, pruned, tuned = report["stages"][0], report["stages"][2], report["stages"][3]
    assert pruned["params"] <= 0.51 * base["params"], (pruned["params"], base["params"])
    assert pruned["metrics"]["params_ratio"] <= 0.51 and tuned["params"] == pruned["params"]
    log = (out / "log.txt").read_text()
    assert "prune: p_g stride" in log and "small_gamma=" in log
    for entry in report["stages"][2:]:
        model, meta = load_model(out / entry["checkpoint"])
        assert "prune" in meta and sum(p.numel() for p in model.parameters()) == entry["params"]


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_add_the_subgradient_once_per_step(two_process_runs: dict) -> None:
    """Two CPU processes, one step each (64 samples, 32 per process): the BN scales after the sparse stage
    differ from plain training by exactly lr * (1 + momentum) * s * sign(gamma), on every replica. Both runs are
    made by the torchrun launch shared with the pipeline's two-process test (tests/compress/two_processes.py)."""
    from tests.compress.two_processes import SGD, SPARSITY as s

    assert two_process_runs["returncode"] == 0, two_process_runs["stderr"][-3000:]
    sparse, plain = two_process_runs["sparse"], two_process_runs["plain"]
    log = (sparse / "log.txt").read_text()
    assert "2 process(es)" in log and "2 replicas in sync" in log, log
    a = load_model(sparse / json.loads((sparse / "report.json").read_text())["stages"][-1]["checkpoint"])[0]
    b = load_model(plain / json.loads((plain / "report.json").read_text())["stages"][-1]["checkpoint"])[0]
    assert (SGD["lr"], SGD["momentum"]) == (0.1, 0.9)
    for name in ("stem.1", "stage2.conv1.1", "stage3.conv2.1"):
        delta = a.get_submodule(name).weight - b.get_submodule(name).weight
        assert torch.allclose(delta, torch.full_like(delta, -0.1 * 1.9 * s), atol=1e-6), (name, delta)
