"""Benchmark of pruning on digits-yolo at equal MACs: our group pruning vs the two classic baselines.

From a fresh clone (one thread): the baseline is the finetune stage of the committed demo recipe, seed 0

    OMP_NUM_THREADS=1 compress run recipes/digits-yolo.yaml --out runs/yolo-s0 --set seed=0
    B=runs/yolo-s0/stages/01-finetune/model.safetensors
    M="group group-global slimming group-constant uniform"
    # tuning (issue 14): each sparse method's L1 rate on the tuning split (first 300 train images), equal MACs
    for r in 0.01 0.003 0.03; do OMP_NUM_THREADS=1 python tools/bench_prune.py --baseline $B --seeds 0 --tune 300 \
        --macs 0.4 --params 0 --finetune-epochs 5 --rate $r --methods $M --out runs/prune-tune-r$r; done
    # scored on val at the tuned rate (3e-3 for every sparse method), at equal MACs and at equal params
    OMP_NUM_THREADS=1 python tools/bench_prune.py --baseline $B --seeds 0 1 --macs 0.4 --params 0 \
        --finetune-epochs 5 --rate 0.003 --methods $M --out runs/prune-scored
    OMP_NUM_THREADS=1 python tools/bench_prune.py --baseline $B --seeds 0 1 --macs 0 --params 0.7 \
        --finetune-epochs 5 --rate 0.003 --methods $M --out runs/prune-scored

(only its finetune stage is used). Without --baseline the script trains a baseline itself into OUT/baseline
(seed 0, the recipe's finetune settings, as a one-stage recipe).

Seeds: every step is a pipeline run whose recipe seed is the --seeds value (the baseline's is 0); the pipeline
seeds torch, numpy and random from it before the model is built and before every stage. The script prints the
baseline, seeds, epochs, targets and thread count.

From one trained yolo-n (the demo's finetune stage; trained here first when --baseline is not given), per seed:

    group      (ours)      dynamic sparse training -> group pruning (per-group |gamma| thresholds, searched)
    slimming   (baseline)  constant-rate sparse training -> one global |gamma| threshold (Network Slimming)
    uniform    (baseline)  plain training -> torch-pruning's uniform magnitude pruning (same share per unit)
    group-global (ablation) dynamic sparse training -> one global |gamma| threshold (tests per-group thresholds)
    group-constant (ablation) constant-rate sparse training -> group pruning

Every method gets the same training budget before pruning (--pre-epochs at the same lr, with or without
the L1 term), removes at least the same share of MACs and params (--macs, --params: the demo's target), then the same plain fine-tune
(--finetune-epochs). Every step is a recipe run by the pipeline into OUT/seedS/<pre-training> or OUT/seedS/<target>/<method> (resumable: a
finished step is not re-run). Prints one table, mAP@0.5 on digits-detect val, mean over seeds.
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
from accelerate.utils import set_seed

from compress.pipeline import run
from compress.recipe import parse_recipe, with_tuning_split

BASE = {
    "model": {"build": "compress:yolo-n", "num_classes": 10},
    "task": "detection",
    "image_size": 128,
    "data": {"train": {"source": "digits-detect", "split": "train"},
             "val": {"source": "digits-detect", "split": "val"},
             "calib": {"source": "digits-detect", "split": "calib"}},
    "train": {"batch_size": 32, "eval_batch_size": 64},
}


def run_recipe(name: str, seed: int, checkpoint: str | None, stages: list[dict[str, Any]], out: Path,
               tune: int = 0) -> dict[str, Any]:
    """Run (or resume) one recipe; returns its report. `tune` > 0: train without the first `tune` train images and
    score on them (the tuning split), never on val."""
    data = json.loads(json.dumps(BASE))
    data.update(name=name, seed=seed, stages=stages)
    if tune:
        data["data"] = with_tuning_split(data["data"], tune)
    if checkpoint:
        data["model"]["checkpoint"] = checkpoint
    report_path = out / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if len(report.get("stages", [])) == len(stages) + 1:
            return report
    return run(parse_recipe(data, source=name), out, resume=out.exists())


def stage_checkpoint(out: Path, index: int, name: str) -> str:
    return str(out / "stages" / f"{index:02d}-{name}" / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="trained yolo-n checkpoint (default: train one, 20 epochs at lr 8e-3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--macs", type=float, default=0.35, help="share of MACs every method removes (at least)")
    ap.add_argument("--params", type=float, default=0.6, help="share of params every method removes (at least; 0: no "
                                                               "params target)")
    ap.add_argument("--pre-epochs", type=int, default=10)
    ap.add_argument("--pre-lr", type=float, default=1e-2)
    ap.add_argument("--rate", type=float, default=1e-2, help="L1 rate s of the sparse runs")
    ap.add_argument("--rate-of", nargs="*", default=[], metavar="METHOD=S",
                    help="a method's own L1 rate (tuned with --tune), e.g. slimming=3e-3")
    ap.add_argument("--tune", type=int, default=0, metavar="N",
                    help="score on the first N train images (a tuning split; every run trains without them)")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--finetune-lr", type=float, default=4e-3)
    ap.add_argument("--methods", nargs="+", default=["group", "slimming", "uniform", "group-constant"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-prune"))
    args = ap.parse_args()
    set_seed(0)  # each pipeline run below seeds itself from its recipe's seed (--seeds; 0 for the baseline)
    started = time.time()

    baseline = args.baseline
    if baseline is None:
        out = args.out / "baseline"
        run_recipe("baseline", 0, None, [{"finetune": {"epochs": 20, "lr": 8e-3, "warmup_epochs": 1}}], out)
        baseline = stage_checkpoint(out, 1, "finetune")

    rate_of = {m: args.rate for m in ("group", "group-global", "slimming", "group-constant")}
    for item in args.rate_of:
        method, _, value = item.partition("=")
        if method not in rate_of:
            ap.error(f"--rate-of {item}: METHOD is one of {', '.join(rate_of)}")
        rate_of[method] = float(value)

    def pre(kind: str, rate: float) -> dict[str, Any]:
        if kind == "plain":
            return {"finetune": {"epochs": args.pre_epochs, "lr": args.pre_lr, "warmup_epochs": 0}}
        return {"sparse": {"epochs": args.pre_epochs, "lr": args.pre_lr, "warmup_epochs": 0, "sparsity": kind,
                           "sparsity_rate": rate}}

    target = {k: v for k, v in (("macs", args.macs), ("params", args.params)) if v}
    target_tag = "-".join(f"{k}{v:g}" for k, v in target.items())
    methods = {"group": ("dynamic", {"prune": {"target": target}}),
               # the per-group threshold claim on its own: the same dynamic schedule, one global threshold
               "group-global": ("dynamic", {"prune": {"target": target, "groups": {"all": ["*"]}}}),
               "slimming": ("constant", {"prune": {"target": target, "groups": {"all": ["*"]}}}),
               "uniform": ("plain", {"prune": {"target": target, "method": "uniform"}}),
               "group-constant": ("constant", {"prune": {"target": target}}),
               # the baseline at the MACs target alone: uniform pruning to 60 % fewer params removes far
               # more MACs than the others, this row compares at (nearly) equal MACs instead
               "uniform-macs": ("plain", {"prune": {"target": {"macs": args.macs}, "method": "uniform"}})}
    finetune = {"finetune": {"epochs": args.finetune_epochs, "lr": args.finetune_lr, "warmup_epochs": 0}}

    rows: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        pre_ckpt: dict[tuple[str, float], tuple[str, list[dict[str, Any]]]] = {}
        for method in args.methods:
            kind, prune = methods[method]
            key = (kind, 0.0 if kind == "plain" else rate_of[method])
            if key not in pre_ckpt:  # one pre-training per (schedule, rate), shared by the methods that use it
                name = f"pre-{kind}" + ("" if kind == "plain" else f"-s{key[1]:g}")
                out = args.out / f"seed{seed}" / name
                report = run_recipe(name, seed, baseline, [pre(*key)], out, args.tune)
                pre_ckpt[key] = (stage_checkpoint(out, 1, next(iter(pre(*key)))), report["stages"])
            # pre-training is shared across targets; each target's prune + fine-tune gets its own folder
            out = (args.out / f"seed{seed}" / target_tag
                   / (method + ("" if key[0] == "plain" or key[1] == args.rate else f"-s{key[1]:g}")))
            report = run_recipe(method, seed, pre_ckpt[key][0], [prune, finetune], out, args.tune)
            base, pruned, tuned = report["stages"]
            rows[method].append({"pre": pre_ckpt[key][1][-1]["metrics"]["map50"],
                                 "pruned": pruned["metrics"]["map50"], "final": tuned["metrics"]["map50"],
                                 "params": pruned["params"] / pre_ckpt[key][1][0]["params"],
                                 "macs": pruned["macs"] / pre_ckpt[key][1][0]["macs"]})
            print(f"seed {seed} {method}: {rows[method][-1]}", flush=True)

    print(f"\nyolo-n on digits-detect (128 px), baseline {baseline}; seeds {args.seeds}; pre-training "
          f"{args.pre_epochs} epochs lr {args.pre_lr} (L1 rate per method {rate_of}); removed at least {target}; "
          f"scored on {'the first %d train images (tuning split)' % args.tune if args.tune else 'val'}; fine-tune "
          f"{args.finetune_epochs} epochs lr {args.finetune_lr}; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"{time.time() - started:.0f} s\n")
    print("| method | mAP@0.5 before pruning | after pruning | after fine-tune (mean) | std | per seed (fine-tuned) "
          "| params | MACs |")
    print("|---|---|---|---|---|---|---|---|")
    for method, runs in rows.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        spread = f"{statistics.stdev(r['final'] for r in runs):.4f}" if len(runs) > 1 else "-"
        per_seed = " / ".join(f"{r['final']:.4f}" for r in runs)
        print(f"| {method} | {mean['pre']:.4f} | {mean['pruned']:.4f} | {mean['final']:.4f} | {spread} | {per_seed} | "
              f"{mean['params']:.3f}x | {mean['macs']:.3f}x |")


if __name__ == "__main__":
    main()
