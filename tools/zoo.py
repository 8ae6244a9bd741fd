"""Zoo runner: does every torchvision model and a broad timm sample shrink, reload and run?

For each model, in a fresh process (one model's crash, hang or memory blow-up never stops the run):
`compress.shrink(None, MODEL, ...)` at random init -- prune (share `--prune`), label-free recovery, quantize to
`--bits`, write the artifact -- then `compress.load` of the artifact and a forward compared with the in-memory
model (shrink's own verification). One JSON line per model goes to OUT/zoo.jsonl (a killed run resumes: models
already there are skipped); OUT/zoo.md is the table: model, params, pass/fail, failing step, one-line reason,
removed share of parameters, seconds. A model that passes but whose pruning missed the target by more than 0.02
has the pruner's reason in the reason column ("target missed: ... kept whole: ...").

    python tools/zoo.py --out runs/zoo                          # everything (hours on a 2-core machine)
    python tools/zoo.py --out runs/zoo --models timm:resnet18 torchvision:shufflenet_v2_x0_5
    python tools/zoo.py --out runs/zoo --families smoke         # the small cross-family set the tests use

Inputs: none made elsewhere (random init, calibration images of the bundled data sets). Seeds: each worker seeds
torch, numpy and random with 0 before building anything, and `compress.shrink` seeds itself with 0 before building
its model; one torch thread per worker. The first line printed gives the settings, the seed and the thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# timm sample: at least one per family the issue names (residual, dense, grouped/depthwise, squeeze-excite,
# channel shuffle, split/concat, NAS-built, re-parameterizable, hybrids with attention, pure ViTs,
# multi-resolution branches), small variants so a model takes seconds to minutes on a CPU.
TIMM_SAMPLE = (
    # residual / bottleneck
    "resnet10t", "resnet18", "resnet26", "resnet50", "resnet18d", "seresnet18", "resnext26ts", "wide_resnet50_2",
    "resnetv2_50", "res2net50_14w_8s", "resnest14d", "skresnet18", "ecaresnet26t", "regnetx_002", "regnety_002",
    "regnetz_005",
    # dense / concat
    "densenet121", "dla34", "dpn68", "vovnet39a", "ese_vovnet19b_dw", "selecsls42b", "cspresnet50", "cspdarknet53",
    "darknet17",
    # depthwise / grouped / squeeze-excite
    "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnetv2_b0", "mixnet_s", "fbnetc_100", "spnasnet_100", "mnasnet_050", "lcnet_050", "tinynet_e",
    "ghostnet_050", "hardcorenas_a", "mobileone_s0", "repvgg_a0", "rexnet_100", "semnasnet_050", "mobilevitv2_050",
    # split / concat branches, multi-resolution (channel shuffle: torchvision shufflenet_v2_*)
    "ghostnetv2_100", "cs3darknet_s", "hrnet_w18_small", "inception_v3",
    "xception41", "dla46_c",
    # attention hybrids and transformers
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "convit_tiny", "coat_lite_tiny", "pit_ti_224",
    "crossvit_tiny_240", "mobilevit_xxs", "efficientformer_l1", "poolformer_s12", "convnext_atto", "convnextv2_atto",
    "edgenext_xx_small", "fastvit_t8", "tiny_vit_5m_224", "nfnet_l0", "botnet26t_256", "halonet26t", "lambda_resnet26t",
    "gernet_s", "vgg11", "resmlp_12_224", "mixer_s16_224", "gmlp_ti16_224",
)
SMOKE = ("torchvision:shufflenet_v2_x0_5", "torchvision:densenet121", "timm:mobilenetv3_small_050",
         "timm:mnasnet_050", "timm:dla46_c", "timm:test_vit")  # test_vit: timm's 0.3 M-parameter ViT

WORKER = r"""
import json, sys, time, traceback
import torch
from accelerate.utils import set_seed
torch.set_num_threads(1)
set_seed(0)  # before any model is built; compress.shrink below seeds itself with 0 too
spec, task, classes, size, prune, bits, calib, samples, out, method = sys.argv[1:11]
step = ["build"]
lines = []
def printer(line):
    lines.append(line)
    if line.startswith("stage "):
        step[0] = line.split(": ", 1)[1].strip() if ": " in line else line
    elif line.startswith("verified"):
        step[0] = "verified"
result = {"model": spec}
start = time.perf_counter()
try:
    import compress
    from compress.models import build_model
    result["params"] = sum(p.numel() for p in build_model(spec, num_classes=int(classes)).parameters())
    step[0] = "shrink setup"
    settings = dict(task=task, prune=float(prune), bits=float(bits), method=method, calib=calib,
                    calib_samples=int(samples), batch_size=int(samples), recover_steps=2, printer=printer)
    try:
        figures = compress.shrink(None, spec, out, int(classes), image_size=int(size), **settings)
    except compress.UserError as exc:  # a model with a fixed input size (ViTs): its own size
        if "cannot run on the calibration images" not in str(exc):
            raise
        result["size"] = "native"
        figures = compress.shrink(None, spec, out, int(classes), **settings)
    step[0] = "reload"
    reloaded = compress.load(out)
    notes = [l.split("WARNING", 1)[1].strip() for l in lines if l.startswith("prune: WARNING target missed")]
    result.update(ok=True, step="", reason="", file_bytes=figures["file_bytes"],
                  removed=round(1 - figures["params_after"] / figures["params_before"], 4),
                  pruned=any(s["name"] == "prune" for s in figures["stages"]), note=" ".join(notes)[:300])
except BaseException as exc:
    text = " ".join(str(exc).split()) or type(exc).__name__
    trace = traceback.format_exc()
    if "in _verify" in trace or "in load" in trace and step[0] == "quantize":
        step[0] = "reload"
    result.update(ok=False, step=step[0], reason=f"{type(exc).__name__}: {text}"[:300],
                  trace=traceback.format_exc()[-2000:])
result["seconds"] = round(time.perf_counter() - start, 1)
result["log_tail"] = lines[-6:]
print("ZOO-RESULT " + json.dumps(result))
"""


def all_models(families: str) -> list[str]:
    if families == "smoke":
        return list(SMOKE)
    import torchvision

    models = []
    if families in ("all", "torchvision"):
        models += [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
        models += [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models.detection)]
    if families in ("all", "timm"):
        models += [f"timm:{n}" for n in TIMM_SAMPLE]
    return models


def is_detection(spec: str) -> bool:
    if not spec.startswith("torchvision:"):
        return False
    import torchvision

    return spec.split(":", 1)[1] in torchvision.models.list_models(module=torchvision.models.detection)


def run_one(spec: str, args: argparse.Namespace, out: Path) -> dict:
    detection = is_detection(spec)
    artifact = out / "artifacts" / (spec.replace(":", "_") + ".safetensors")
    artifact.parent.mkdir(parents=True, exist_ok=True)
    size = args.detection_size if detection else args.size
    cmd = [sys.executable, "-c", WORKER, spec, "detection" if detection else "classification",
           "11" if detection else "10", str(size), str(args.prune), str(args.bits),
           "digits-detect" if detection else args.calib, str(args.samples), str(artifact), args.method]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec, "ok": False, "step": "timeout", "reason": f"over {args.timeout} s",
                "seconds": round(time.perf_counter() - start, 1)}
    for line in done.stdout.splitlines():
        if line.startswith("ZOO-RESULT "):
            result = json.loads(line[len("ZOO-RESULT "):])
            if not args.keep_artifacts:
                artifact.unlink(missing_ok=True)
            return result
    tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-1:])[:300]
    return {"model": spec, "ok": False, "step": "process", "reason": f"exit {done.returncode}: {tail}",
            "seconds": round(time.perf_counter() - start, 1)}


def table(results: list[dict]) -> str:
    ok = sum(r["ok"] for r in results)
    lines = [f"{ok} of {len(results)} pass", "",
             "| model | params | result | step | reason | removed | seconds |", "|---|---:|---|---|---|---:|---:|"]
    for r in results:
        removed = f"{r['removed']:.3f}" if r.get("removed") is not None and r.get("pruned") else "-"
        reason = (r.get("reason") or r.get("note") or "").replace("|", "\\|")
        lines.append(f"| {r['model']} | {r.get('params', 0):,} | {'pass' if r['ok'] else 'FAIL'} | "
                     f"{r.get('step', '')} | {reason} | {removed} | {r.get('seconds', 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*", help="specs to run (default: the whole zoo of --families)")
    parser.add_argument("--families", choices=("all", "torchvision", "timm", "smoke"), default="all")
    parser.add_argument("--prune", type=float, default=0.3)
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--method", default="jlcm")
    parser.add_argument("--size", type=int, default=64, help="input side of classifiers")
    parser.add_argument("--detection-size", type=int, default=128)
    parser.add_argument("--calib", default="digits")
    parser.add_argument("--samples", type=int, default=4, help="calibration images")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--keep-artifacts", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "zoo.jsonl"
    done = {json.loads(line)["model"]: json.loads(line) for line in log.read_text().splitlines()} if log.exists() else {}
    models = args.models or all_models(args.families)
    print(f"zoo: {len(models)} models, {sum(m in done for m in models)} already done "
          f"(prune {args.prune}, {args.bits} bits {args.method}, {args.size} px, {args.samples} calibration images of "
          f"{args.calib}; seed 0, 1 thread per model)",
          flush=True)
    for i, spec in enumerate(models):
        if spec in done:
            continue
        result = run_one(spec, args, args.out)
        done[spec] = result
        with log.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        status = "pass" if result["ok"] else f"FAIL at {result['step']}: {result['reason'][:120]}"
        print(f"[{i + 1}/{len(models)}] {spec}: {status} ({result['seconds']} s)", flush=True)
    results = [done[m] for m in models if m in done]
    (args.out / "zoo.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
