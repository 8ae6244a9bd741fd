"""Benchmark of `compress.quant`: jlcm vs kmeans vs rtn (2, 3, 4 bits) and nf4, on digits models or a run's stage.

The inputs of every table in docs/BENCHMARKS.md "Quantization (issue 5)", from a fresh clone (one thread):

    # digits-cnn: trained here (seed 0, 8 epochs), saved, then benchmarked from the saved state dict
    OMP_NUM_THREADS=1 python tools/bench_quant.py --seed 0 --epochs 8 --save digits_cnn.pt
    OMP_NUM_THREADS=1 python tools/bench_quant.py --seed 0 --checkpoint digits_cnn.pt --ablation
    # timm models: random init (seeded by --seed), 30 epochs on digits at 32 px
    OMP_NUM_THREADS=1 python tools/bench_quant.py --model timm:mobilenetv3_large_100 --seed 0 --epochs 30 --save mbv3.pt
    OMP_NUM_THREADS=1 python tools/bench_quant.py --model timm:mobilenetv3_large_100 --seed 0 --checkpoint mbv3.pt --ablation
    OMP_NUM_THREADS=1 python tools/bench_quant.py --model timm:resnet18 --seed 0 --epochs 30 --save r18.pt
    OMP_NUM_THREADS=1 python tools/bench_quant.py --model timm:resnet18 --seed 0 --checkpoint r18.pt --ablation
    # digits-yolo: the distill stage of the committed demo recipe (seed 0), then its checkpoint
    OMP_NUM_THREADS=1 compress run recipes/digits-yolo.yaml --out runs/yolo-s0 --set seed=0
    OMP_NUM_THREADS=1 python tools/bench_quant.py --run-dir runs/yolo-s0 --stage distill --ablation
    # timing only (random init, random calibration images, both from --seed)
    OMP_NUM_THREADS=1 python tools/bench_quant.py --timing --model timm:mobilenetv3_large_100 --image-size 224 \
        --calib-images 256

Seeds: `--seed` (default 0) seeds torch, numpy and random before any model or dataset is built; the model's
initial weights and its training order come from it. (Before commit 9436df9 the model was built before the
seed was set, so checkpoints saved by older versions cannot be rebuilt.) The run directory of `--run-dir` is
made by `compress run`, which seeds every stage from the recipe's seed. The first line printed says the
model, data, seed, epochs or checkpoint and the torch thread count.

Model mode (--model): random-init models are trained briefly on the digits train split (32 px, AdamW,
one-cycle, +-2 px shifts), then every method quantizes a copy with the calib split's images only (180) and
is scored by top-1 on the val split (360). Run mode (--run-dir RUN --stage NAME): the model is the stage's
checkpoint (RUN/stages/NN-NAME/model.safetensors), calibrated on the recipe's calib split and scored by
the recipe's task on its val split, exactly as the pipeline evaluates (e.g. mAP@0.5 on digits-detect).
Bits per weight count everything stored: `bpw` over the quantized weights (indices, codebooks, scales,
row maps) and `model bpw` over all parameters (BN and biases in fp32), as the size report counts.
`out_err` is the relative squared error of the model's outputs against the float model on val inputs.
`--ablation` adds jlcm's mapping variants at 2 bits: proximal (ours), plain STE, codebooks only (frozen),
and the k-means init alone. `--timing` only times one jlcm run (mixed, 2 bits) of a random-init model (1000
classes) on random calibration images of the given size: wall and CPU seconds of sensitivity and of the
layer-by-layer quantization, with the machine's load average. Runs single-threaded by default: on a shared
CPU, two torch threads contending for a core make the many small ops of calibration far slower.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed

import compress.quant as cq
from calib import get_dataset
from compress.models import build_model
from compress.models.protocol import float_outputs as model_outputs


def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = get_dataset("digits", split)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))])


def train(model: nn.Module, epochs: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = tensors("train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            b = perm[i:i + 64]
            shift = (int(torch.randint(-2, 3, ())), int(torch.randint(-2, 3, ())))
            loss = F.cross_entropy(model(torch.roll(x[b], shifts=shift, dims=(2, 3))), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y).float().mean())


class Bench:
    """What a benchmark needs: the float model, calibration batches, the metric and outputs of a model."""

    model: nn.Module
    calib: list[Any]
    metric_name: str
    score: Callable[[nn.Module], float]
    probe: list[Any]  # inputs the output error is measured on

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        model.eval()
        return [t for x in self.probe for t in model_outputs(model(x))]


def digits_bench(args: argparse.Namespace) -> Bench:
    bench = Bench()
    set_seed(args.seed)  # the model's initial weights come from the seed too
    model = build_model(args.model, num_classes=10)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    else:
        start = time.perf_counter()
        train(model, args.epochs, args.seed)
        print(f"trained {args.model} {args.epochs} epochs in {time.perf_counter() - start:.0f}s", flush=True)
        if args.save:
            torch.save(model.state_dict(), args.save)
    bench.model = model.eval()
    xv, yv = tensors("val")
    xc, _ = tensors("calib")
    bench.calib = [xc[i:i + 32] for i in range(0, len(xc), 32)]
    bench.metric_name, bench.score = "top1", lambda m: top1(m, xv, yv)
    bench.probe = [xv[i:i + 256] for i in range(0, len(xv), 256)]
    return bench


def run_bench(args: argparse.Namespace) -> Bench:
    """The checkpoint of stage `args.stage` of the run `args.run_dir`, with its recipe's task and data."""
    from compress.format.checkpoint import load_model
    from compress.pipeline import RunContext, make_accelerator
    from compress.recipe import load_recipe
    from compress.tasks import get_task

    run_dir = Path(args.run_dir)
    found = sorted(run_dir.glob(f"stages/*-{args.stage}/model.safetensors"))
    if not found:
        stages = sorted(p.parent.name for p in run_dir.glob("stages/*/model.safetensors"))
        raise SystemExit(f"{run_dir}: no checkpoint of stage '{args.stage}' (found: {', '.join(stages) or 'none'})")
    recipe = load_recipe(run_dir / "recipe.yaml")
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=make_accelerator(), task=get_task(recipe.task))
    model, meta = load_model(found[-1])
    if "quantization" in meta:
        raise SystemExit(f"{found[-1]}: already quantized; pick a stage before quantize")
    bench = Bench()
    bench.model = model.eval()
    batch_size = next((e.config.batch_size for e in recipe.stages if e.name == "quantize"), 32)
    loader = ctx.task.loader(ctx.dataset("calib"), batch_size, shuffle=False)
    bench.calib = [ctx.task.inputs(b) for b in loader]
    bench.metric_name = ctx.task.primary_metric
    bench.score = lambda m: ctx.evaluate(m, "val")[ctx.task.primary_metric]
    val = ctx.task.loader(ctx.dataset("val"), recipe.train.eval_batch_size, shuffle=False)
    bench.probe = [ctx.task.inputs(b) for b, _ in zip(val, range(2))]
    print(f"{found[-1]} ({recipe.task}, {len(ctx.dataset('calib'))} calib images, {len(ctx.dataset('val'))} val)",
          flush=True)
    return bench


def timing(args: argparse.Namespace) -> None:
    """Wall and CPU time of one jlcm run on a random-init model and random calibration images."""
    import os

    set_seed(args.seed)
    model = build_model(args.model, num_classes=1000).eval()
    gen = torch.Generator().manual_seed(args.seed)
    size, n = args.image_size, args.calib_images
    calib = [torch.rand(min(32, n - i), 3, size, size, generator=gen) for i in range(0, n, 32)]
    options = {"bits": 2.0, **json.loads(args.options)}
    marks: dict[str, tuple[float, float]] = {}

    def progress(event: dict[str, Any]) -> None:
        marks.setdefault(event["phase"], (time.perf_counter(), time.process_time()))

    load = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    cq.quantize(model, calib, method="jlcm", progress=progress, **options)
    wall, cpu_total = time.perf_counter() - start, time.process_time() - cpu
    split = marks.get("quantize", (start, cpu))
    summary = model.quantization_plan["summary"]
    params = summary["weights"]  # the quantized weights (they are buffers now)
    print(json.dumps({"model": args.model, "quantized_weights": params, "image_size": size, "calib_images": n,
                      "threads": torch.get_num_threads(), "options": options, "wall_s": round(wall, 1),
                      "cpu_s": round(cpu_total, 1), "sensitivity_wall_s": round(split[0] - start, 1),
                      "sensitivity_cpu_s": round(split[1] - cpu, 1), "bits_per_weight": summary["bits_per_weight"],
                      "model_bits_per_weight": summary["model_bits_per_weight"],
                      "loadavg_before": [round(v, 2) for v in load],
                      "loadavg_after": [round(v, 2) for v in os.getloadavg()]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="compress:digits-cnn")
    parser.add_argument("--checkpoint", help="state dict to start from (else train --epochs)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--save", help="where to save the trained state dict")
    parser.add_argument("--run-dir", help="a run directory of `compress run`: benchmark one of its stage checkpoints")
    parser.add_argument("--stage", default="distill", help="with --run-dir: the stage whose checkpoint is quantized")
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="*", default=["jlcm", "kmeans", "rtn", "nf4"])
    parser.add_argument("--mixed", type=float, nargs="*", default=[2.0, 2.5, 3.0],
                        help="also jlcm with mixed precision at these average bits (whole model)")
    parser.add_argument("--ablation", action="store_true", help="jlcm mapping: proximal vs ste vs frozen at 2 bits")
    parser.add_argument("--options", default="{}", help="JSON options added to every jlcm run, e.g. '{\"groups\": 16}'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's init and its training")
    parser.add_argument("--timing", action="store_true", help="only time one jlcm run (mixed 2 bits) of a random-init "
                        "--model (1000 classes) on random images")
    parser.add_argument("--image-size", type=int, default=224, help="--timing: calibration image side")
    parser.add_argument("--calib-images", type=int, default=256, help="--timing: calibration images")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)  # torch, numpy and random, before any model or dataset is built
    source = (f"run {args.run_dir} stage {args.stage}" if args.run_dir else
              f"model {args.model} on digits, " + (f"checkpoint {args.checkpoint}" if args.checkpoint else
                                                   f"trained {args.epochs} epochs"))
    print(f"bench_quant: {source}; seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s)", flush=True)
    if args.timing:
        timing(args)
        return
    bench = run_bench(args) if args.run_dir else digits_bench(args)
    model = bench.model
    extra = json.loads(args.options)

    runs: list[tuple[str, dict]] = []
    for bits in args.bits:
        for method in args.methods:
            if method == "nf4":
                continue
            options = {"allocation": "uniform", **extra} if method == "jlcm" else {}
            runs.append((method, {"bits": bits, **options}))
    if "nf4" in args.methods:
        runs.append(("nf4", {}))
    runs += [("jlcm", {"bits": b, **extra}) for b in args.mixed]
    if args.ablation:
        done = 2 in args.bits and "jlcm" in args.methods  # the proximal row is jlcm's 2-bit row then
        runs += [("jlcm", {"bits": 2, "allocation": "uniform", **extra, "mapping": m})
                 for m in ("proximal", "ste", "frozen") if not (done and m == "proximal")]
        runs += [("jlcm", {"bits": 2, "allocation": "uniform", **extra, "calib_steps": 0})]

    reference = bench.outputs(model)
    name = bench.metric_name
    rows = [{"method": "float", "options": {}, name: bench.score(model), "out_err": 0.0, "bpw": 32.0,
             "model_bpw": 32.0, "seconds": 0.0, "cpu_seconds": 0.0}]
    print(f"{'method':7s} {'options':58s} {name:>6s} {'out_err':>8s} {'bpw':>6s} {'model':>6s} {'wall':>7s} "
          f"{'cpu':>7s}")
    print(f"{'float':7s} {'':58s} {rows[0][name]:6.4f}", flush=True)
    for method, options in runs:
        quantized = copy.deepcopy(model)
        start, cpu = time.perf_counter(), time.process_time()
        cq.quantize(quantized, bench.calib, method=method, **options)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        out = bench.outputs(quantized)
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(out, reference))
        den = sum(float((b ** 2).sum()) for b in reference)
        summary = quantized.quantization_plan["summary"]
        row = {"method": method, "options": options, name: bench.score(quantized), "out_err": num / max(den, 1e-30),
               "bpw": summary["bits_per_weight"], "model_bpw": summary["model_bits_per_weight"], "seconds": seconds,
               "cpu_seconds": cpu}
        rows.append(row)
        print(f"{method:7s} {json.dumps(options):58s} {row[name]:6.4f} {row['out_err']:8.4f} {row['bpw']:6.3f} "
              f"{row['model_bpw']:6.3f} {seconds:6.1f}s {cpu:6.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.run_dir or args.model, "stage": args.stage if args.run_dir else None,
                       "metric": name, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
