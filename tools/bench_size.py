"""Accuracy vs artifact size of a finished run: re-run its quantize and export stages at several bit budgets.

Each variant forks the run directory after the stage before quantize (the checkpoints are copied, the report is
cut there) and resumes the committed recipe with `--set` overrides of the quantize stage, so every figure comes
from the same pruned and distilled model, seed and calibration data. Prints and writes (JSON + Markdown) per
variant: the metric, its drop from the baseline (the run's first stage), the artifact's bytes, its ratio to the
fp32 baseline's bytes, bits per parameter (every stored tensor; the file) and where the bytes go
(compress.format.breakdown).

From a fresh clone (issue 13's tables in docs/BENCHMARKS.md; one thread). --run-dir is a finished run of
--recipe made with the same --set overrides:

  OMP_NUM_THREADS=1 compress run recipes/digits-yolo.yaml --out runs/yolo-s0 --set seed=0
  OMP_NUM_THREADS=1 python tools/bench_size.py --run-dir runs/yolo-s0 --recipe recipes/digits-yolo.yaml \
      --set seed=0 --bits 1.75 2 1.5 1.25 --variant fold_bn=false@1.75 --out runs/size-yolo
  OMP_NUM_THREADS=1 compress run recipes/digits-cls.yaml --out runs/cls-s0 --set seed=0
  OMP_NUM_THREADS=1 python tools/bench_size.py --run-dir runs/cls-s0 --recipe recipes/digits-cls.yaml \
      --set seed=0 --bits 2 1.75 1.5 --out runs/size-cls

Other seeds: `--set seed=S` in both commands (and `--out runs/cls-sS`, `--out runs/size-cls-sS`). Seeds: the
forked runs resume the recipe, so the pipeline seeds torch, numpy and random from the recipe's seed before
each stage; the script itself seeds with the recipe's seed before anything. It prints the run, recipe,
seed and thread count.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("header", "manifest", "indices_raw", "indices_coded", "codebooks", "scales", "biases", "bn", "other_float")


def fork_run(run_dir: Path, dest: Path, keep: int) -> None:
    """A copy of `run_dir` that holds only its first `keep` finished stages (checkpoints, recipe, report)."""
    report = json.loads((run_dir / "report.json").read_text())
    if len(report["stages"]) < keep:
        raise SystemExit(f"{run_dir} has {len(report['stages'])} finished stages; {keep} are needed")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(run_dir / "recipe.yaml", dest / "recipe.yaml")
    for stage in report["stages"][:keep]:
        src = run_dir / stage["checkpoint"]
        (dest / src.parent.relative_to(run_dir)).mkdir(parents=True, exist_ok=True)
        for f in src.parent.iterdir():
            shutil.copy2(f, dest / f.relative_to(run_dir))
    report["stages"] = report["stages"][:keep]
    (dest / "report.json").write_text(json.dumps(report, indent=1))


def run_variant(recipe_path: Path, run_dir: Path, dest: Path, overrides: list[str],
                base: list[str] = (), keep: int | None = None) -> dict[str, Any]:
    from compress.format.breakdown import byte_breakdown
    from compress.pipeline import run
    from compress.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(base))
    names = [next(iter(s)) for s in recipe.to_dict()["stages"]]
    q = names.index("quantize")
    fork_run(run_dir, dest, q if keep is None else keep)
    start = time.perf_counter()
    report = run(load_recipe(recipe_path, [*base, *(f"stages.{q}.quantize.{o}" for o in overrides)]), dest,
                 resume=True)
    seconds = time.perf_counter() - start
    base, quant, last = report["stages"][0], report["stages"][q], report["stages"][-1]
    metric = "map50" if "map50" in last["metrics"] else "top1"
    artifact = dest / "model.safetensors"
    parts = byte_breakdown(artifact)
    return {"overrides": overrides, "metric": metric, "baseline": base["metrics"][metric],
            "value": last["metrics"][metric], "drop": base["metrics"][metric] - last["metrics"][metric],
            "file_bytes": parts["file"], "fp32_bytes": base["size_bytes"], "ratio": base["size_bytes"] / parts["file"],
            "params": last["params"], "bits_per_weight": last["bits_per_weight"],
            "file_bits_per_param": last.get("file_bits_per_param"),
            "quant_bits_per_weight": quant["metrics"].get("quant_bits_per_weight"), "parts": parts,
            "seconds": round(seconds, 1)}


def markdown(rows: list[dict[str, Any]]) -> str:
    metric = rows[0]["metric"]
    head = (f"| variant | {metric} | drop | file bytes | x fp32 | bits/param (tensors) | bits/param (file) | "
            + " | ".join(PARTS) + " |")
    lines = [head, "|" + "---|" * (7 + len(PARTS))]
    for r in rows:
        lines.append(f"| {' '.join(r['overrides'])} | {r['value']:.4f} | {r['drop']:+.4f} | {r['file_bytes']:,} | "
                     f"{r['ratio']:.1f} | {r['bits_per_weight']:.2f} | {r['file_bits_per_param']:.2f} | "
                     + " | ".join(f"{r['parts'][p]:,}" for p in PARTS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run of --recipe")
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--bits", type=float, nargs="*", default=[2.0], help="quantize budgets (bits per weight)")
    parser.add_argument("--variant", nargs="*", default=[],
                        help="extra variants: 'key=value,key=value@BITS' quantize overrides at BITS")
    parser.add_argument("--out", type=Path, required=True, help="folder for the forked runs and the tables")
    parser.add_argument("--set", dest="base", nargs="*", default=[],
                        help="recipe overrides the run was made with (e.g. seed=1), as `compress run --set`; with "
                             "--keep-stages, also overrides of the stages after the kept ones")
    parser.add_argument("--keep-stages", type=int, default=None, metavar="N",
                        help="fork after the run's first N finished stages (default: every stage before quantize), so "
                             "that --set can change the later ones, e.g. the recovery: stages.3.distill.epochs=15")
    args = parser.parse_args()

    import torch
    from accelerate.utils import set_seed

    from compress.recipe import load_recipe

    seed = load_recipe(args.recipe, list(args.base)).seed
    set_seed(seed)  # the resumed runs seed every stage themselves from the recipe's seed
    variants = [[f"bits={b}"] for b in args.bits]
    for v in args.variant:
        opts, _, bits = v.partition("@")
        variants.append([f"bits={float(bits or 2.0)}", *opts.split(",")])
    print(f"bench_size: run {args.run_dir}, recipe {args.recipe} (seed {seed}, --set {args.base}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}", flush=True)
    rows = []
    for overrides in variants:
        name = "_".join(o.replace("=", "") for o in overrides)
        row = run_variant(args.recipe, args.run_dir, args.out / name, overrides, args.base, args.keep_stages)
        rows.append(row)
        print(f"{' '.join(overrides)}: {row['metric']} {row['value']:.4f} (drop {row['drop']:+.4f}), "
              f"{row['file_bytes']:,} bytes ({row['ratio']:.1f}x fp32), {row['bits_per_weight']:.2f} bits/param "
              f"tensors, {row['file_bits_per_param']:.2f} file, {row['seconds']} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "size.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "size.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
