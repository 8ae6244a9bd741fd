"""One `torchrun --nproc_per_node 2` launch shared by the tests that need two CPU processes (gloo).

Each process pays its own start-up (torch, accelerate, the MAC counter's torch-pruning, the digits data: ~7 s of
CPU), so the runs those tests check go through one launch, in order, in both processes:

1. `compress run TINY --out ddp --set stages.1.evaluate.split=val`: the CLI's main(), as `python -m compress`
   calls it (tests/compress/test_pipeline.py: identical replicas, the log, the report);
2. `run(sparse)`, then `run(plain)`: one SGD step each (64 samples, 32 per process), with and without the
   constant L1 sub-gradient (tests/compress/sparse/test_sparse_pipeline.py: added once per step).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

SPARSITY = 1e-2
SGD = {"epochs": 1, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "warmup_epochs": 0, "grad_clip": None,
       "weight_decay": 0.0, "schedule": "constant"}

SCRIPT = """
import sys
import compress.prune, compress.sparse
from compress.cli import main
from compress.pipeline import run
from compress.recipe import load_recipe
code = main(["run", sys.argv[1], "--out", sys.argv[2], "--set", "stages.1.evaluate.split=val"])
if code:
    sys.exit(code)
run(load_recipe(sys.argv[3]), sys.argv[4])
run(load_recipe(sys.argv[5]), sys.argv[6])
"""


def _recipe(tiny: str, stages: list, samples: int, path: Path) -> Path:
    data = yaml.safe_load(tiny)
    data["stages"] = stages
    data["data"]["train"]["samples"] = samples
    data["data"].pop("calib", None)
    path.write_text(yaml.safe_dump(data))
    return path


def launch(tiny: str, folder: Path) -> dict[str, object]:
    """Run the three runs under one torchrun launch in `folder`; {"returncode", "stderr": the launch's, "ddp" |
    "sparse" | "plain": the run directories (str)}."""
    tiny_path = folder / "tiny.yaml"
    tiny_path.write_text(tiny)
    sparse = _recipe(tiny, [{"sparse": {**SGD, "sparsity": "constant", "sparsity_rate": SPARSITY}}], 64,
                     folder / "sparse.yaml")
    plain = _recipe(tiny, [{"finetune": SGD}], 64, folder / "plain.yaml")
    script = folder / "two_processes.py"
    script.write_text(SCRIPT)
    out = {"ddp": folder / "ddp", "sparse": folder / "sparse", "plain": folder / "plain"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tiny_path), str(out["ddp"]), str(sparse), str(out["sparse"]), str(plain), str(out["plain"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return {"returncode": done.returncode, "stderr": done.stderr, **{k: str(v) for k, v in out.items()}}
