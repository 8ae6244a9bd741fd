"""`run_sweep`: every point of the grid through `run_shrink`, one artifact each, evaluated on a labelled split.

    DIR/points/NAME.safetensors    the artifact of a point (NAME = jlcm-b2.5-p0.4)
    DIR/points/NAME.json           its figures, written once it is evaluated: the point's cache entry
    DIR/original.json              the original's metric and fp32 size (cached the same way)
    DIR/sweep.json                 every point (done, skipped with the reason, failed), rewritten after each
    DIR/report.html, frontier.png  the report (compress.evaluate.frontier)

A point's cache entry holds the hash of everything that decides its result (the checkpoint's bytes, the
shrink settings, the evaluation split, the version of compress); a rerun on the same DIR reuses every entry whose hash matches, so a
killed sweep resumes at the point it was in and a changed setting redoes only what it changes.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress._version import __version__
from compress.errors import UserError
from compress.sweep.config import SweepConfig

SWEEP_FORMAT, SWEEP_VERSION = "compress-sweep", 1


def point_name(method: str, bits: float, prune: float) -> str:
    return f"{method}-b{bits:g}-p{prune:g}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def folder_refused(data: str) -> UserError:
    """A sweep evaluates a data source's split, not a folder of images."""
    return UserError(f"--data {data}: a folder of images; give a data source's split, SOURCE:SPLIT (labelled: the "
                     "task's metric; unlabelled, e.g. photos:val: agreement with the original)")


# the metric of a sweep over unlabelled data: agreement with the original (compress.evaluate.fidelity)
AGREEMENT_METRIC = {"classification": "confident_agreement", "detection": "box_f1"}


class Evaluator:
    """The evaluation split, prepared once per preprocessing and kept in memory; metrics of a model on it: the
    task's own (labelled data), or its agreement with the original model (unlabelled data, e.g. photos:val)."""

    def __init__(self, data: str, task: str, batch_size: int) -> None:
        from calib import get_dataset
        from compress.tasks import get_task

        self.data, self.task, self.batch_size = data, get_task(task), batch_size
        if Path(data).expanduser().is_dir():
            raise folder_refused(data)
        source, _, split = data.rpartition(":")
        self.base = get_dataset(source, split)
        if len(self.base) == 0:
            raise UserError(f"--data {data}: the split holds no images")
        self.labelled = bool(getattr(self.base, "num_classes", 0)) and self._labelled()
        self.metric = self.task.primary_metric if self.labelled else AGREEMENT_METRIC[self.task.name]
        self.original: tuple[Any, dict[str, Any]] | None = None  # unlabelled: the model and preprocessing compared with
        self._prepared: dict[str, list[Any]] = {}

    def _labelled(self) -> bool:
        _, target = self.base[0]
        if isinstance(target, dict):
            return True
        return int(target) >= 0

    def _loader(self, preprocessing: dict[str, Any]) -> Any:
        from compress.shrink.data import Prepared
        from compress.shrink.preprocess import Preprocessing

        key = json.dumps(preprocessing, sort_keys=True)
        if key not in self._prepared:
            prepared = Prepared(self.base, Preprocessing.from_dict(preprocessing), self.task.name)
            self._prepared[key] = [prepared[i] for i in range(len(prepared))]
        return self.task.loader(self._prepared[key], self.batch_size, shuffle=False)

    def metrics(self, model: Any, preprocessing: dict[str, Any]) -> dict[str, float]:
        if self.labelled:
            return self.task.evaluate(model, self._loader(preprocessing))
        from compress.evaluate.fidelity import fidelity

        if self.original is None:
            raise RuntimeError("an unlabelled sweep needs the original model first (Evaluator.original)")
        original, original_pre = self.original
        original_loader = None if original_pre == preprocessing else self._loader(original_pre)
        return fidelity(model, original, self._loader(preprocessing), self.task.name, original_loader)


def _original(config: SweepConfig, evaluator: Evaluator, fingerprint: str | None, out_dir: Path,
              say: Callable[[str], None]) -> dict[str, Any]:
    """The original model's metrics and fp32 size, with the preprocessing `compress shrink` would give it."""
    from calib import get_dataset
    from compress.evaluate import measure
    from compress.format.checkpoint import atomic_write_json
    from compress.models import build_model
    from compress.shrink.data import calib_ref
    from compress.shrink.preprocess import resolve

    key = _key({"checkpoint": fingerprint, "model": config.model, "num_classes": config.num_classes,
                "task": config.task, "data": config.data, "calib": config.calib, "image_size": config.image_size,
                "mean": config.mean, "std": config.std, "compress": __version__})
    path = out_dir / "original.json"
    cached = _read_json(path)
    if cached and cached.get("key") == key and evaluator.labelled:
        return cached
    start = time.perf_counter()
    from compress.shrink.run import read_checked_checkpoint

    if config.checkpoint is not None:
        read_checked_checkpoint(config.checkpoint)
    net = build_model(config.model, num_classes=config.num_classes, checkpoint=config.checkpoint).eval()
    ref = calib_ref(config.calib)
    base_size = None
    if ref["source"] != "folder":
        base_size = getattr(get_dataset(ref["source"], ref["split"], **ref.get("options", {})), "image_size", None)
    elif config.image_size is None:
        base_size = 224
    pre = resolve(config.model, net, config.task, base_size, config.image_size, config.mean, config.std)
    if pre.image_size is None:
        raise UserError(f"--image-size is needed: {config.model} and --calib {config.calib} give no input size")
    if not evaluator.labelled:  # the points are compared with this model: built again on every (re)run
        evaluator.original = (net, pre.to_dict())
        if cached and cached.get("key") == key:
            return cached
    metrics = evaluator.metrics(net, pre.to_dict())
    figures = measure(net, evaluator.task.example_input(net, pre.image_size))
    result = {"key": key, "metrics": metrics, "metric": metrics[evaluator.metric],
              "size_bytes": figures["size_bytes"], "params": figures["params"], "macs": figures["macs"],
              "preprocessing": pre.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(path, result)
    return result


def run_sweep(config: SweepConfig, out_dir: str | Path, quiet: bool = False,
              printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir`; returns what sweep.json holds. A point that fails is recorded
    as failed with its reason and the others still run."""
    from compress.evaluate.frontier import (
        pareto,
        recommend,
        settings,
        write_sweep_report,
    )
    from compress.format.artifact import load
    from compress.format.checkpoint import atomic_write_json
    from compress.shrink.run import run_shrink

    start = time.perf_counter()
    say = (lambda _: None) if quiet else (lambda m: printer(m))
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: not a folder")
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise UserError(f"{config.checkpoint}: checkpoint not found")
    (out_dir / "points").mkdir(parents=True, exist_ok=True)
    fingerprint = file_sha256(config.checkpoint) if config.checkpoint is not None else None
    evaluator = Evaluator(config.data, config.task, config.eval_batch_size)
    original = _original(config, evaluator, fingerprint, out_dir, say)
    if not evaluator.labelled and evaluator.metric == "confident_agreement" and not original["metrics"]["confident_images"]:
        evaluator.metric = "agreement"  # confident on nothing: agreement on every image is what is left to rank by
        original = {**original, "metric": original["metrics"]["agreement"]}
        say(f"the original is confident (top probability >= 0.5) on none of {config.data}: the metric is agreement "
            "on every image")
    metric = evaluator.metric
    say(f"original {config.model}: {metric}={original['metric']:.4f} on {config.data}, "
        f"{original['size_bytes']:,} bytes fp32 ({original['params']:,} params)")

    grid = config.grid()
    todo = sum(status == "todo" for *_, status, _ in grid)
    say(f"grid: {len(grid)} points ({todo} to run, {len(grid) - todo} skipped: invalid settings), "
        f"methods {' '.join(config.methods)}, bits {' '.join(f'{b:g}' for b in config.bits)}, "
        f"prune {' '.join(f'{p:g}' for p in config.prune)}")
    sweep: dict[str, Any] = {
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION, "model": config.model, "checkpoint": config.checkpoint,
        "checkpoint_sha256": fingerprint, "task": config.task, "metric": metric, "data": config.data,
        "calib": config.calib, "tolerance": config.tolerance, "config": config.model_dump(mode="json"),
        "original": {k: v for k, v in original.items() if k != "key"}, "points": [], "seconds": 0.0}

    def save() -> None:
        sweep["seconds"] = round(sum(p.get("seconds", 0) for p in sweep["points"]) + original["seconds"], 1)
        front = {p["id"] for p in pareto(sweep["points"])}
        for p in sweep["points"]:
            p["pareto"] = p["id"] in front
        best = recommend(sweep["points"], original["metric"], config.tolerance)
        sweep["recommended"] = best["id"] if best else None
        atomic_write_json(out_dir / "sweep.json", sweep)

    ran_seconds: list[float] = []
    finished = failed = 0
    for index, (method, bits, prune, status, reason) in enumerate(grid, 1):
        name = point_name(method, bits, prune)
        base = {"id": name, "method": method, "bits": bits, "prune": prune}
        where = f"[{index}/{len(grid)}] {method} {bits:g} bits, prune {prune:g}"
        if status == "skipped":
            sweep["points"].append({**base, "status": "skipped", "reason": reason})
            say(f"{where}: skipped: {reason}")
            continue
        shrink_config = config.shrink_config(method, bits, prune)
        settings_used = shrink_config.model_dump(mode="json")
        if not prune:  # recovery runs only after pruning
            settings_used = {k: v for k, v in settings_used.items() if k not in ("recover", "recover_steps")}
        key = _key({"checkpoint": fingerprint, "shrink": settings_used, "data": config.data, "version": SWEEP_VERSION,
                    "compress": __version__})
        entry_path, artifact = out_dir / "points" / f"{name}.json", out_dir / "points" / f"{name}.safetensors"
        cached = _read_json(entry_path)
        if cached and cached.get("key") == key and artifact.is_file() and artifact.stat().st_size == cached["file_bytes"]:
            point = {**cached, "artifact": str(artifact)}  # the folder may have moved since
            note = "cached"
        else:
            t0 = time.perf_counter()
            try:
                result = run_shrink(shrink_config, artifact, verify=True, quiet=True)
                shrink_seconds = time.perf_counter() - t0
                model = load(artifact)
                metrics = evaluator.metrics(model, result["preprocessing"])
            except Exception as exc:
                if isinstance(exc, UserError) and finished == 0:
                    raise  # most likely a setting every point shares (checkpoint, calibration): its one line
                failed += 1
                text = (str(exc).strip().splitlines() or [""])[0]
                sweep["points"].append({**base, "status": "failed", "reason": f"{type(exc).__name__}: {text}",
                                        "seconds": round(time.perf_counter() - t0, 2)})
                print(f"{where}: failed: {type(exc).__name__}: {text}", file=sys.stderr, flush=True)
                save()
                continue
            seconds = time.perf_counter() - t0
            file_bytes = artifact.stat().st_size
            point = {**base, "key": key, "status": "done", "artifact": str(artifact), "file_bytes": file_bytes,
                     "params": result["params_after"], "macs": result["macs_after"],
                     "bits_per_param": round(file_bytes * 8 / result["params_after"], 4),
                     "bits_per_weight": result["bits_per_weight"],
                     "quantized_bits_per_weight": result.get("quantized_bits_per_weight"),
                     "ratio": round(original["size_bytes"] / file_bytes, 3), "metrics": metrics,
                     "metric": metrics[metric], "shrink_seconds": round(shrink_seconds, 2),
                     "eval_seconds": round(seconds - shrink_seconds, 2), "seconds": round(seconds, 2),
                     "preprocessing": result["preprocessing"]}
            atomic_write_json(entry_path, point)
            ran_seconds.append(seconds)
            note = f"{seconds:.1f} s"
        finished += 1
        sweep["points"].append({k: v for k, v in point.items() if k != "key"})
        save()
        left = sum(s == "todo" for *_, s, _ in grid[index:])
        pace = sum(ran_seconds) / len(ran_seconds) if ran_seconds else None
        eta = f", ~{_duration(pace * left)} left at {pace:.1f} s/point" if pace is not None and left else ""
        say(f"{where}: {metric}={point['metric']:.4f} ({(point['metric'] - original['metric']) * 100:+.2f} pt), "
            f"{point['file_bytes']:,} bytes ({point['bits_per_param']:.2f} bits/param), {note}; "
            f"{finished} done, {left} left{eta}")
    save()
    report = write_sweep_report(sweep, out_dir)
    sweep["report"] = str(report)
    best = sweep.get("recommended")
    front = pareto(sweep["points"])
    say(f"Pareto frontier: {', '.join(settings(p) for p in front) or 'none'}")
    if best:
        point = next(p for p in sweep["points"] if p["id"] == best)
        say(f"recommended (smallest within {config.tolerance:g} point of the original): {settings(point)}: "
            f"{metric}={point['metric']:.4f}, {point['file_bytes']:,} bytes, {point['artifact']}")
    else:
        say(f"no point is within {config.tolerance:g} point of the original's {metric}")
    sweep["failed"] = failed
    sweep["wall_seconds"] = round(time.perf_counter() - start, 1)
    return sweep
