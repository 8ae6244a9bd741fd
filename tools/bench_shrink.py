"""Benchmark of `compress shrink` on a real trained checkpoint: how often the shrunk model keeps the
original model's top-1 on held-back images, JLCM against plain round-to-nearest (rtn) at the same bits.

From a fresh clone (the table of docs/BENCHMARKS.md "Shrink (issue 7)"; one thread):

    OMP_NUM_THREADS=1 compress run recipes/digits-cls.yaml --out runs/cls-full --set seed=0
    OMP_NUM_THREADS=1 python tools/bench_shrink.py --checkpoint runs/cls-full/stages/01-finetune/model.safetensors \
        --bits 4 3 2 --prune 0 0.5 --recover-steps -1 0 100

Default checkpoint: the digits classifier trained by that `compress run` (its finetune stage,
`runs/cls-full/stages/01-finetune/model.safetensors`, model `compress:digits-cnn`, 10 classes, 32 px; only the
finetune stage is used). Seeds: the script seeds torch, numpy and random with --seed (default 0) before
building the model, and every shrink runs with that seed (shrink seeds itself before building its copy).
It prints the checkpoint, data, seed and thread count. Every setting runs `compress.shrink.shrink` (the same code as the CLI) on the calib split only
(unlabelled use), writes the artifact, reloads it with `compress.load` (with the manifest's preprocessing)
and compares its top-1 with the original model's on the val split, which calibration never sees.
Columns: agreement = share of val images where the shrunk model's top-1 equals the original's; top-1 =
accuracy against the labels; bits/w = every stored bit of the whole model over its parameters; file =
the artifact's size in bytes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

import compress
from calib import get_dataset
from compress.models import build_model
from compress.shrink import shrink
from compress.shrink.data import Prepared
from compress.shrink.preprocess import Preprocessing

DEFAULT_CHECKPOINT = "runs/cls-full/stages/01-finetune/model.safetensors"


@torch.no_grad()
def predictions(model: torch.nn.Module, data: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """top-1 predictions and labels over the whole dataset."""
    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=False)
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--model", default="compress:digits-cnn")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--calib", default="digits", help="calibration source (its calib split)")
    parser.add_argument("--val", default="digits", help="held-back source (its val split)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--bits", type=float, nargs="+", default=[4, 3])
    parser.add_argument("--methods", nargs="+", default=["jlcm", "rtn"])
    parser.add_argument("--prune", type=float, nargs="+", default=[0.0])
    parser.add_argument("--recover-steps", type=int, nargs="+", default=[0],
                        help="distillation steps after pruning; -1: no recover stage at all (not even BN)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the script and of every shrink")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    print(f"bench_shrink: {args.model} from {args.checkpoint}; calib {args.calib}:calib x {args.calib_samples}, "
          f"val {args.val}:val; seed {args.seed}; {torch.get_num_threads()} thread(s)", flush=True)

    original = build_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prune in args.prune:
            for steps in (args.recover_steps if prune > 0 else [0]):
                for bits in args.bits:
                    for method in args.methods:
                        out = Path(tmp) / f"{method}-{bits}-{prune}-{steps}.safetensors"
                        t0 = time.perf_counter()
                        result = shrink(args.checkpoint, args.model, out, args.num_classes, prune=prune, bits=bits,
                                        method=method, calib=args.calib, calib_samples=args.calib_samples,
                                        recover=steps >= 0, recover_steps=max(steps, 0), quiet=True,
                                        seed=args.seed)
                        seconds = time.perf_counter() - t0
                        pre = Preprocessing.from_dict(result["preprocessing"])
                        val = Prepared(get_dataset(args.val, "val"), pre, "classification")
                        want, labels = predictions(original, val)
                        got, _ = predictions(compress.load(out), val)
                        row = {"method": method, "bits": bits, "prune": prune, "recover_steps": steps,
                               "agreement": float((got == want).float().mean()),
                               "top1": float((got == labels).float().mean()),
                               "original_top1": float((want == labels).float().mean()),
                               "bits_per_weight": result["bits_per_weight"], "file_bytes": result["file_bytes"],
                               "params": result["params_after"], "seconds": round(seconds, 1), "val_images": len(val)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print()
    print(f"checkpoint {args.checkpoint} ({args.model}), calibration: {args.calib_samples} images of {args.calib}:calib,"
          f" held back: {args.val}:val ({rows[0]['val_images']} images), original top-1 {rows[0]['original_top1']:.4f}")
    print()
    print("| method | --bits | --prune | recovery | agreement with original top-1 | top-1 | bits/weight | file (bytes) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recover = "-" if not r["prune"] else "none" if r["recover_steps"] < 0 else f"BN + {r['recover_steps']} KD steps"
        print(f"| {r['method']} | {r['bits']:g} | {r['prune']:g} | {recover} | {r['agreement']:.4f} | "
              f"{r['top1']:.4f} | {r['bits_per_weight']:.2f} | {r['file_bytes']:,} | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
