"""Check `compress.onnx.export_onnx` on an artifact: ONNX sizes, and onnxruntime vs `compress.load` outputs.

    python tools/check_onnx.py                                        # runs/yolo-s0's artifact, digits-detect:val
    python tools/check_onnx.py ARTIFACT --data digits:val --images 64 --map

ARTIFACT is the model.safetensors a `compress run` writes. From a fresh clone (one thread):

    OMP_NUM_THREADS=1 compress run recipes/digits-yolo.yaml --out runs/yolo-s0 --set seed=0
    OMP_NUM_THREADS=1 python tools/check_onnx.py runs/yolo-s0/model.safetensors --data digits-detect:val --map
    OMP_NUM_THREADS=1 compress run recipes/digits-cls.yaml --out runs/cls-s0 --set seed=0
    OMP_NUM_THREADS=1 python tools/check_onnx.py runs/cls-s0/model.safetensors --data digits:val --map

(`tools/bench_size.py --out runs/size-yolo` writes one artifact per bit budget, e.g.
runs/size-yolo/bits1.75/model.safetensors.) Nothing here is random (seeds are set to 0 all the same, before the
artifact is loaded); the first line printed gives the artifact, data, opset and thread count.

Exports the artifact packed and dense (into --out-dir, a temporary folder by default), runs the first
--images images of the split through `compress.load(ARTIFACT)` and through both ONNX files in onnxruntime
(CPU), and prints the file sizes, the ratios to the artifact and the largest absolute output difference
(per output, over all images). `--map` also evaluates the whole split with the task's metric (mAP for
detection, top-1 for classification) from the onnxruntime outputs, next to compress.load's. The last line
is the JSON of every figure. Single-threaded (torch and onnxruntime) unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class OrtModel(nn.Module):
    """An onnxruntime session behind the model interface the tasks evaluate (outputs as torch tensors;
    `postprocess` and the detector attributes borrowed from the loaded model)."""

    def __init__(self, path: Path, like: nn.Module, threads: int) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.like = [like]  # not a submodule
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # tasks read the device from it
        for name in ("num_classes", "strides"):
            if hasattr(like, name):
                setattr(self, name, getattr(like, name))
        if hasattr(like, "postprocess"):
            self.postprocess = like.postprocess
            self.detection_loss = like.detection_loss

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        outs = [torch.from_numpy(o) for o in self.session.run(None, {"images": x.cpu().numpy()})]
        return outs[0] if len(outs) == 1 else outs


def _as_list(out) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", default="runs/yolo-s0/model.safetensors")
    parser.add_argument("--data", default="digits-detect:val", help="SOURCE:SPLIT of the images")
    parser.add_argument("--images", type=int, default=32, help="images compared output by output")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--map", action="store_true", help="also score the whole split from the ONNX outputs")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--out-dir", default=None, help="keep the .onnx files here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from accelerate.utils import set_seed

    set_seed(0)
    print(f"check_onnx: {args.artifact}, data {args.data} ({args.images} images compared), opset "
          f"{args.opset or 'default'}, seed 0, {torch.get_num_threads()} torch thread(s), {args.threads} onnxruntime "
          "thread(s)", flush=True)

    import compress
    from calib import get_dataset
    from compress.format.artifact import read_artifact
    from compress.onnx import export_onnx
    from compress.tasks import get_task

    artifact = Path(args.artifact)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        result: dict = {"artifact": str(artifact), "artifact_bytes": artifact.stat().st_size}
        paths = {}
        for form in ("packed", "dense"):
            start = time.perf_counter()
            info = export_onnx(artifact, out_dir / f"{artifact.stem}.{form}.onnx", dense=form == "dense",
                               opset=args.opset)
            paths[form] = Path(info["path"])
            result[form] = {"bytes": info["bytes"], "ratio": info["ratio"], "opset": info["opset"],
                            "export_s": round(time.perf_counter() - start, 2)}
            print(f"{form:6s} {info['path']}: {info['bytes']:,} bytes = {info['ratio']:.3f} x the artifact "
                  f"({result['artifact_bytes']:,} bytes), opset {info['opset']}, {result[form]['export_s']} s")

        model = compress.load(artifact)
        runners = {form: OrtModel(path, model, args.threads) for form, path in paths.items()}
        source, _, split = args.data.rpartition(":")
        data = get_dataset(source, split)
        n = min(args.images, len(data))
        images = torch.stack([data[i][0] for i in range(n)])
        worst: dict[str, list[float]] = {form: [] for form in runners}
        scale: list[float] = []
        with torch.no_grad():
            for start in range(0, n, args.batch_size):
                x = images[start:start + args.batch_size]
                ref = _as_list(model(x))
                scale = [max(s, float(r.abs().max())) for s, r in zip(scale or [0.0] * len(ref), ref)]
                for form, runner in runners.items():
                    diffs = [float((o - r).abs().max()) for o, r in zip(_as_list(runner(x)), ref)]
                    worst[form] = [max(a, b) for a, b in zip(worst[form] or [0.0] * len(diffs), diffs)]
        result["images"] = n
        result["output_abs_max"] = [round(s, 4) for s in scale]
        for form in runners:
            result[form]["max_abs_diff"] = [float(f"{d:.3g}") for d in worst[form]]
            print(f"{form:6s} max |onnxruntime - compress.load| over {n} {args.data} images, per output: "
                  f"{result[form]['max_abs_diff']} (outputs reach |y| <= {result['output_abs_max']})")

        if args.map:
            _, manifest = read_artifact(artifact)
            task = get_task(manifest["task"])
            batch = manifest.get("eval_batch_size", 64)
            scores = {"compress.load": task.evaluate(model, task.loader(data, batch, shuffle=False))}
            for form, runner in runners.items():
                scores[f"onnx {form}"] = task.evaluate(runner, task.loader(data, batch, shuffle=False))
            result["metrics"] = {k: {m: round(v, 4) for m, v in s.items()} for k, s in scores.items()}
            for name, metrics in result["metrics"].items():
                print(f"{name:14s} {args.data} ({len(data)} images): {metrics}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
