"""How `compress shrink` time and memory grow with the model: wall seconds and peak RSS against parameters.

For each model (timm / torchvision, random init) and each setting, in a fresh process (a crash, hang or memory
blow-up of one never stops the run): `compress.shrink(None, MODEL, ...)` on `--samples` crops of `photos:calib`
at `--size` px, 1000 classes, quiet. Settings: `4bit` (JLCM, `--bits 4`), `prune0.3+4bit` (`--prune 0.3
--bits 4`, the default recovery), `3bit` (JLCM 3 bits in every layer: `allocation: uniform`, no mixed search).
The worker applies the CLI's `retain_freed_memory` first. Each result (wall seconds, peak RSS of the worker,
its CPU seconds, which a loaded machine does not inflate, seconds per quantization phase, parameters) is one
JSON line of OUT/scale.jsonl; a killed run resumes (a (model, setting) pair already there is skipped; `--redo`
runs them again). At the end OUT/scale.json holds
every result with the machine (CPU, cores, threads, load average before and after each run) and
OUT/scale.png plots seconds against parameters per setting (matplotlib), with the linear fit through the
smallest model for reference.

    OMP_NUM_THREADS=1 python tools/bench_scale.py --out runs/scale                       # the default models
    python tools/bench_scale.py --out runs/scale --models timm:resnet18 --settings 4bit --samples 16
    python tools/bench_scale.py --out runs/scale --threads 2                             # 2 torch threads

The docs/BENCHMARKS.md row (issue 17): `OMP_NUM_THREADS=1 python tools/bench_scale.py --out runs/scale --models
timm:mobilenetv2_100 --settings 4bit`. Inputs: none made elsewhere (random init, photos bundled with installed
packages). Seeds: each worker seeds torch, numpy and random with 0 before building anything, and
`compress.shrink` seeds itself with 0 before building its model. The first line printed gives the machine,
threads, crops and size; each result line the model and setting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# public architectures from 2M to 30M parameters (1000 classes)
DEFAULT_MODELS = ("timm:mobilenetv2_100",  # 3.5 M, depthwise
                  "timm:efficientnet_b0",  # 5.3 M, depthwise + squeeze-excite
                  "timm:resnet18",  # 11.7 M
                  "timm:resnet26",  # 16.0 M, bottlenecks
                  "timm:resnet34",  # 21.8 M
                  "timm:resnet50",  # 25.6 M, the model
                  "timm:convnext_tiny")  # 28.6 M, large linears (MLP blocks)
SETTINGS = {"4bit": {"bits": 4.0, "prune": 0.0}, "prune0.3+4bit": {"bits": 4.0, "prune": 0.3},
            # JLCM at 3 bits in every layer: no mixed-precision search, the "JLCM 3-bit alone" of issue 17
            "3bit": {"bits": 3.0, "prune": 0.0, "options": {"allocation": "uniform"}}}

WORKER = r"""
import json, os, resource, sys, time
import torch
from accelerate.utils import set_seed
spec, size, samples, bits, prune, out, threads, options = sys.argv[1:9]
torch.set_num_threads(int(threads))
from compress.cli import retain_freed_memory
retain_freed_memory()  # as the `compress` CLI does at start
set_seed(0)  # before any model is built; compress.shrink below seeds itself with 0 too
phases = {}
def timed(module, name, key):
    fn = getattr(module, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
import compress.quant.api as api, compress.quant.jlcm as jlcm
timed(api, "measure_sensitivity", "sensitivity")
timed(api, "collect_stats", "capture")
timed(jlcm, "jlcm_learn", "learn")
import compress
from compress.models import build_model
result = {"model": spec, "params": sum(p.numel() for p in build_model(spec, num_classes=1000).parameters())}
start = time.perf_counter()
try:
    figures = compress.shrink(None, spec, out, 1000, bits=float(bits), prune=float(prune), calib="photos:calib",
                              calib_samples=int(samples), image_size=int(size), quiet=True,
                              quant_options=json.loads(options))
    result.update(ok=True, stages={s["name"]: s["seconds"] for s in figures["stages"][1:]},
                  bits_per_weight=figures["quantized_bits_per_weight"], params_after=figures["params_after"])
except BaseException as exc:
    result.update(ok=False, reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
result["seconds"] = round(time.perf_counter() - start, 1)
result["phases"] = {k: round(v, 1) for k, v in phases.items()}
usage = resource.getrusage(resource.RUSAGE_SELF)
result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # what a loaded machine does not inflate
print("SCALE-RESULT " + json.dumps(result))
"""


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def run_one(spec: str, setting: str, args: argparse.Namespace) -> dict:
    values = SETTINGS[setting]
    artifact = args.out / "artifacts" / f"{spec.replace(':', '_')}-{setting}.safetensors"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", WORKER, spec, str(args.size), str(args.samples), str(values["bits"]),
           str(values["prune"]), str(artifact), str(args.threads),
           json.dumps({**values.get("options", {}), **json.loads(args.options)})]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    load_before = list(os.getloadavg())
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec, "setting": setting, "ok": False, "reason": f"over {args.timeout} s",
                "seconds": round(time.perf_counter() - start, 1), "load_before": load_before,
                "load_after": list(os.getloadavg())}
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("SCALE-RESULT "):
            result = json.loads(line[len("SCALE-RESULT "):])
    if result is None:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-1:])[:300]
        result = {"model": spec, "ok": False, "reason": f"exit {done.returncode}: {tail}",
                  "seconds": round(time.perf_counter() - start, 1)}
    artifact.unlink(missing_ok=True)
    result.update(setting=setting, threads=args.threads, samples=args.samples, size=args.size,
                  load_before=load_before, load_after=list(os.getloadavg()))
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in SETTINGS:
        rows = sorted((r for r in results if r["setting"] == setting and r.get("ok")), key=lambda r: r["params"])
        if not rows:
            continue
        x = [r["params"] / 1e6 for r in rows]
        y = [r["seconds"] for r in rows]
        line, = ax.plot(x, y, "o-", label=setting)
        ax.plot([0, max(x)], [0, y[0] / x[0] * max(x)], ":", color=line.get_color(), alpha=0.6)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["model"].split(":", 1)[1], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("compress shrink wall seconds")
    ax.set_title("shrink time vs parameters (dotted: linear from the smallest model)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--samples", type=int, default=128, help="calibration crops of photos:calib")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--options", default="{}", help="JSON: extra quantize options")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per (model, setting)")
    parser.add_argument("--redo", action="store_true", help="run pairs already in scale.jsonl again")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "scale.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["setting"])] = r
    info = machine(args.threads)
    pairs = [(m, s) for m in args.models for s in args.settings]
    skipped = sum(p in done for p in pairs) if not args.redo else 0
    print(f"bench_scale: {info['cpu']}, {info['cores']} cores, {args.threads} thread(s), seed 0, load {info['load_average']}; "
          f"{len(pairs)} runs, {skipped} already done ({args.samples} crops, {args.size} px)", flush=True)
    for i, (spec, setting) in enumerate(pairs):
        if (spec, setting) in done and not args.redo:
            continue
        result = run_one(spec, setting, args)
        done[(spec, setting)] = result
        with log.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        status = "ok" if result.get("ok") else f"FAIL: {result.get('reason', '')[:120]}"
        print(f"[{i + 1}/{len(pairs)}] {spec} {setting}: {status}, {result.get('params', 0):,} params, "
              f"{result['seconds']} s (cpu {result.get('cpu_seconds', '?')} s), peak RSS {result.get('peak_rss_mb', '?')} MB, phases {result.get('phases')}, "
              f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}", flush=True)
    results = [done[p] for p in pairs if p in done]
    (args.out / "scale.json").write_text(json.dumps({"machine": {**info, "load_average_end": list(os.getloadavg())},
                                                     "results": results}, indent=1))
    if not args.no_plot:
        plot(results, args.out / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
