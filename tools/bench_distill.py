"""Benchmark of the recovery after pruning: plain fine-tuning vs output KD vs attention distillation vs both.

From a fresh clone (one thread; RUN is a finished run of a committed recipe). Issue 14's pre-registered test
(docs/BENCHMARKS.md "Distillation at the hard ratio"), K = 0, 1, 2:

    OMP_NUM_THREADS=1 compress run recipes/digits-yolo.yaml --out runs/yolo-sK --set seed=K --threads 1
    W="--attention-weights backbone=1e4 neck=1e3 coarsest=1e2"
    # tuning (seed 0, the first 300 train images; the other candidates: --attention-scale 0.01, --balance 0.1 / 0.01)
    OMP_NUM_THREADS=1 python tools/bench_distill.py runs/yolo-s0 --seeds 0 --tune 300 --variants attention $W \
        --out runs/tune-w1
    # scored on val
    OMP_NUM_THREADS=1 python tools/bench_distill.py runs/yolo-sK --seeds K $W --out runs/score-sK
    # digits-cls (its recipe recovers by distill; its own weights)
    OMP_NUM_THREADS=1 compress run recipes/digits-cls.yaml --out runs/cls-s0 --set seed=0 --threads 1
    OMP_NUM_THREADS=1 python tools/bench_distill.py runs/cls-s0 --seeds 0 --out runs/bench-distill-cls

Seeds: every variant is a pipeline run whose recipe seed is the --seeds value; the pipeline seeds torch,
numpy and random from it before the model is built and before every stage. The script itself seeds with 0
before reading anything. It prints the model, data, prune and training settings, seeds and thread count.

RUN is a finished demo run (its recipe.yaml has a prune stage followed by a distill or finetune recovery). From
the checkpoint of the stage before its prune stage, every variant re-runs the same prune (deterministic: the same
pruned model) and then trains with the recovery stage's settings (epochs, lr, batch; attention weights from a
distill stage or --attention-weights), changing only the loss: `finetune` (task loss), `output-kd` (+ output
distillation, --kd-weight), `attention` (+ spatial attention maps) and `both`. Every step is a pipeline run into OUT/seed<k>/<variant>
(resumable). The metric is the task's: mAP@0.5 on digits-detect val, top-1 on digits val.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from compress.stages.distill import AttentionConfig
from compress.pipeline import run
from compress.recipe import parse_recipe, with_tuning_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--kd-weight", type=float, default=1.0, help="output-distillation weight of output-kd and both")
    ap.add_argument("--attention-weights", nargs="+", default=[], metavar="ROLE=W",
                    help="per-role attention weights (backbone, neck, coarsest), replacing the run's distill stage's "
                         "(needed when the run recovers by finetune: else the stage's defaults)")
    ap.add_argument("--attention-scale", type=float, default=1.0, help="multiply the run's attention weights")
    ap.add_argument("--balance", type=float, default=None,
                    help="attention betas per distilled layer, each layer's term starting at this value (replaces the "
                         "run's per-role weights and --attention-scale)")
    ap.add_argument("--tune", type=int, default=0, metavar="N",
                    help="score on a tuning split carved out of train (its first N images; training skips them) "
                         "instead of val: choose weights with this, then score on val without it")
    ap.add_argument("--variants", nargs="+", default=["finetune", "output-kd", "attention", "both"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-distill"))
    args = ap.parse_args()
    set_seed(0)  # each pipeline run below seeds itself from its recipe's seed (--seeds)
    started = time.time()

    recipe = yaml.safe_load((args.run_dir / "recipe.yaml").read_text())
    names = [next(iter(s)) for s in recipe["stages"]]
    p = names.index("prune")
    recovery = names[p + 1] if p + 1 < len(names) else None
    if recovery not in ("distill", "finetune"):
        ap.error(f"{args.run_dir}: the stage after prune is {recovery!r}; a distill or finetune recovery is needed")
    report = json.loads((args.run_dir / "report.json").read_text())
    done = [s["name"] for s in report["stages"]]
    source = args.run_dir / report["stages"][done.index("prune") - 1]["checkpoint"]  # the model the prune got
    prune_cfg, recovery_cfg = recipe["stages"][p]["prune"], recipe["stages"][p + 1][recovery]
    # the variants train with the recovery stage's settings (epochs, lr, ...) whichever loss it used
    train = {k: v for k, v in recovery_cfg.items() if k not in ("teacher", "attention", "output_kd")}
    attention = json.loads(json.dumps(recovery_cfg.get("attention", {})))
    for item in args.attention_weights:
        role, _, value = item.partition("=")
        if role not in AttentionConfig().weights:
            ap.error(f"--attention-weights {item}: ROLE is one of {', '.join(AttentionConfig().weights)}")
        attention.setdefault("weights", {})[role] = float(value)
    if args.attention_scale != 1.0:
        weights = attention.get("weights", AttentionConfig().weights)
        attention["weights"] = {role: w * args.attention_scale for role, w in weights.items()}
    if args.balance is not None:  # the stage then sets every beta from the starting terms
        attention["balance"] = args.balance
    off = {"weights": {"backbone": 0.0, "neck": 0.0, "coarsest": 0.0}}
    variants: dict[str, dict[str, Any]] = {
        "finetune": {"finetune": train},
        "output-kd": {"distill": {**train, "attention": off, "output_kd": {"weight": args.kd_weight}}},
        "attention": {"distill": {**train, "attention": attention}},
        "both": {"distill": {**train, "attention": attention, "output_kd": {"weight": args.kd_weight}}},
    }
    metric = "map50" if recipe["task"] == "detection" else "top1"

    split_data = with_tuning_split(recipe["data"], args.tune) if args.tune else recipe["data"]
    results: dict[str, list[float]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            data = {**recipe, "name": f"distill-{variant}", "seed": seed, "data": split_data,
                    "model": {**recipe["model"], "checkpoint": str(source)},
                    "stages": [{"prune": prune_cfg}, variants[variant]]}
            out = args.out / f"seed{seed}" / variant
            done = out / "report.json"
            rep = json.loads(done.read_text()) if done.exists() else None
            if rep is None or len(rep["stages"]) < 3:
                rep = run(parse_recipe(data, source=variant), out, resume=out.exists())
            results[variant].append(rep["stages"][-1]["metrics"][metric])
            pruned = rep["stages"][1]["metrics"][metric]
            print(f"seed {seed} {variant}: {metric} after prune {pruned:.4f}, after training {results[variant][-1]:.4f}",
                  flush=True)

    print(f"\n{recipe['model']['build']} on {recipe['data']['train']['source']}; pruned from {source} with {prune_cfg}; "
          f"training {train}; scored on {split_data['val']}; attention {attention}; output-KD weight "
          f"{args.kd_weight}; seeds {args.seeds}; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {time.time() - started:.0f} s\n")
    print(f"| variant | {metric} (mean) | std | min - max | per seed |")
    print("|---|---|---|---|---|")
    for variant, values in results.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {variant} | {mean:.4f} | {std:.4f} | {min(values):.4f} - {max(values):.4f} | "
              f"{' / '.join(f'{v:.4f}' for v in values)} |")


if __name__ == "__main__":
    main()
