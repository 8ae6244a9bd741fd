"""Benchmark of `compress.quant` on digits classifiers: jlcm vs kmeans vs rtn (2, 3, 4 bits) and nf4.

    python tools/bench_quant.py                                          # digits-cnn, trained here 8 epochs
    python tools/bench_quant.py --model timm:mobilenetv3_large_100 --epochs 30 --save /tmp/mbv3.pt
    python tools/bench_quant.py --model timm:mobilenetv3_large_100 --checkpoint /tmp/mbv3.pt --ablation

Random-init models are trained briefly on the digits train split (AdamW, one-cycle, +-2 px shifts), then
every method quantizes a copy with the calib split's images only (180) and is scored by top-1 on the val
split. Bits per weight count everything stored: `bpw` over the quantized weights (indices, codebooks,
scales, row maps) and `model bpw` over all parameters (BN and biases in fp32), as the size report counts.
`--ablation` adds jlcm's mapping variants at 2 bits: proximal (ours), plain STE, codebooks only (frozen).
Runs single-threaded by default: on a shared CPU, two torch threads contending for a core make the many
small ops of calibration far slower.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

import compress.quant as cq
from calib import get_dataset
from compress.models import build_model


def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = get_dataset("digits", split)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))])


def train(model: torch.nn.Module, epochs: int, seed: int = 0) -> None:
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
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="compress:digits-cnn")
    parser.add_argument("--checkpoint", help="state dict to start from (else train --epochs)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--save", help="where to save the trained state dict")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["jlcm", "kmeans", "rtn", "nf4"])
    parser.add_argument("--mixed", type=float, nargs="*", default=[2.0, 2.5, 3.0],
                        help="also jlcm with mixed precision at these average bits (whole model)")
    parser.add_argument("--ablation", action="store_true", help="jlcm mapping: proximal vs ste vs frozen at 2 bits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.model, num_classes=10)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    else:
        start = time.perf_counter()
        train(model, args.epochs)
        print(f"trained {args.model} {args.epochs} epochs in {time.perf_counter() - start:.0f}s", flush=True)
        if args.save:
            torch.save(model.state_dict(), args.save)
    model.eval()
    xv, yv = tensors("val")
    xc, _ = tensors("calib")
    calib = [xc[i:i + 32] for i in range(0, len(xc), 32)]
    with torch.no_grad():
        reference = model(xv)

    runs: list[tuple[str, dict]] = []
    for bits in args.bits:
        for method in args.methods:
            if method == "nf4":
                continue
            options = {"allocation": "uniform"} if method == "jlcm" else {}
            runs.append((method, {"bits": bits, **options}))
    if "nf4" in args.methods:
        runs.append(("nf4", {}))
    runs += [("jlcm", {"bits": b}) for b in args.mixed]
    if args.ablation:
        runs += [("jlcm", {"bits": 2, "allocation": "uniform", "mapping": m}) for m in ("ste", "frozen")]
        runs += [("jlcm", {"bits": 2, "allocation": "uniform", "calib_steps": 0})]

    rows = [{"method": "float", "options": {}, "top1": top1(model, xv, yv), "out_err": 0.0, "bpw": 32.0,
             "model_bpw": 32.0, "seconds": 0.0}]
    print(f"{'method':7s} {'options':58s} {'top1':>6s} {'out_err':>8s} {'bpw':>6s} {'model':>6s} {'time':>7s}")
    print(f"{'float':7s} {'':58s} {rows[0]['top1']:6.4f}")
    for method, options in runs:
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        cq.quantize(quantized, calib, method=method, **options)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = quantized(xv)
        summary = quantized.quantization_plan["summary"]
        row = {"method": method, "options": options, "top1": top1(quantized, xv, yv),
               "out_err": float(((out - reference) ** 2).sum() / (reference ** 2).sum()),
               "bpw": summary["bits_per_weight"], "model_bpw": summary["model_bits_per_weight"], "seconds": seconds}
        rows.append(row)
        print(f"{method:7s} {json.dumps(options):58s} {row['top1']:6.4f} {row['out_err']:8.4f} {row['bpw']:6.3f} "
              f"{row['model_bpw']:6.3f} {seconds:6.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
