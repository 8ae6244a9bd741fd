"""sparse -> prune -> finetune through the runner, and the sub-gradient under two processes."""
import json
import os
import subprocess
import sys
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


PAIR = """
import sys
import compress.prune, compress.sparse
from compress.pipeline import run
from compress.recipe import load_recipe
run(load_recipe(sys.argv[1]), sys.argv[2])
run(load_recipe(sys.argv[3]), sys.argv[4])
"""
SGD = {"epochs": 1, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "warmup_epochs": 0, "grad_clip": None,
       "weight_decay": 0.0, "schedule": "constant"}


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_add_the_subgradient_once_per_step(tiny_recipe_path: Path, tmp_path: Path) -> None:
    """Two CPU processes, one step each (64 samples, 32 per process): the BN scales after the sparse stage
    differ from plain training by exactly lr * (1 + momentum) * s * sign(gamma), on every replica."""
    s = 1e-2
    sparse = _recipe(tiny_recipe_path, [{"sparse": {**SGD, "sparsity": "constant", "sparsity_rate": s}}], 64)
    plain = _recipe(tiny_recipe_path, [{"finetune": SGD}], 64)
    script = tmp_path / "pair.py"
    script.write_text(PAIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(sparse), str(tmp_path / "sparse"), str(plain), str(tmp_path / "plain")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "sparse" / "log.txt").read_text()
    assert "2 process(es)" in log and "2 replicas in sync" in log, log
    a = load_model(tmp_path / "sparse" / json.loads((tmp_path / "sparse/report.json").read_text())["stages"][-1]["checkpoint"])[0]
    b = load_model(tmp_path / "plain" / json.loads((tmp_path / "plain/report.json").read_text())["stages"][-1]["checkpoint"])[0]
    for name in ("stem.1", "stage2.conv1.1", "stage3.conv2.1"):
        delta = a.get_submodule(name).weight - b.get_submodule(name).weight
        assert torch.allclose(delta, torch.full_like(delta, -0.1 * 1.9 * s), atol=1e-6), (name, delta)
