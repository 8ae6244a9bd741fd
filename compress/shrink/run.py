"""`shrink`: one checkpoint -> one artifact, through a recipe built on the fly and the pipeline's stages.

    recipe = prune {target: {params: R}, importance: data}   (when R > 0; no sparse training: channels scored
                                              by the share of their readers' output they carry on calibration images)
             recover {bn, steps}              (when R > 0 and asked; label-free: BN re-estimation, distillation)
             quantize {method: jlcm, bits: B} (calibration images only)
The stages are the registered ones, run by a `RunContext` as `compress run` runs them, except that no stage
is evaluated (calibration data may be unlabelled) and the artifact is written by `write_artifact` with the
preprocessing in its manifest (the export stage cannot add it). Nothing but the output file is left behind
(the run directory is temporary).
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from compress.errors import UserError
from compress.pipeline import RunContext, make_accelerator, run_stages
from compress.models.protocol import (UNSUPPORTED_DETECTOR, detector_stages, flat_tensors, is_detector,
                                      is_torchvision_detector, raw_outputs)
from compress.recipe import Recipe, parse_recipe
from compress.shrink.data import calib_ref, load_calib, with_read_size
from compress.shrink.preprocess import parse_floats, resolve
from compress.shrink.config import DEFAULT_RECOVER_STEPS, SHRINK_JLCM_DEFAULTS, ShrinkConfig



@dataclass
class ShrinkContext(RunContext):
    """A RunContext that serves the prepared calibration images for every data role, logs to the console
    only (unless quiet) and keeps the unpruned model in memory as the recover stage's teacher."""

    calib_data: Dataset | None = None
    quiet: bool = False
    lines: list[str] = field(default_factory=list)
    printer: Callable[[str], None] = print

    def dataset(self, role: str) -> Dataset:
        assert self.calib_data is not None
        return self.calib_data

    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.is_main and not self.quiet:
            self.printer(message)

    def warn(self, message: str) -> None:
        """A warning: on stderr, even when quiet."""
        self.lines.append(f"warning: {message}")
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        if self.quiet:
            yield lambda **_: None
            return
        with super().progress(description, total) as advance:
            yield advance


def read_checked_checkpoint(path: str) -> None:
    """Fail early, in one line, on a checkpoint that is not a plain state dict (pickled objects)."""
    from compress.models import CheckpointError, read_state_dict

    try:
        read_state_dict(path)
    except CheckpointError as exc:
        cause = exc.__cause__
        if isinstance(cause, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f" (it pickles {found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint '{path}' is not a plain state dict{what}: it is loaded with weights_only=True, "
                "which refuses pickled Python objects; save model.state_dict() with torch.save, or as .safetensors"
            ) from None
        raise


def check_supported(spec: str, model: nn.Module) -> None:
    """One-line refusals for model kinds the one-shot pipeline cannot take."""
    if is_torchvision_detector(model) and detector_stages(model) is None:
        raise UserError(f"{spec} ({type(model).__name__}): {UNSUPPORTED_DETECTOR}")


def failing_layer(model: nn.Module, x: Any) -> tuple[str | None, BaseException | None]:
    """Run `model(x)`; on an exception, the innermost module that was running and the exception."""
    stack: list[str] = []

    def enter(_m: nn.Module, _a: Any, name: str) -> None:
        stack.append(name)

    def leave(_m: nn.Module, _a: Any, _o: Any) -> None:  # must return None: a value would replace the output
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(m, a, n)))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), raw_outputs(model):
            model(x)
    except Exception as exc:  # noqa: BLE001  (any failure is reported with the layer it happened in)
        return (stack[-1] if stack else None), exc
    finally:
        for handle in handles:
            handle.remove()
    return None, None


def check_forward(spec: str, model: nn.Module, data: Dataset, task: str) -> None:
    """The model must run on a batch of the prepared calibration images; else one line naming the layer."""
    from compress.tasks import get_task

    x = get_task(task).inputs(next(iter(get_task(task).loader(data, 2, shuffle=False))))
    was_training = model.training
    model.eval()
    layer, exc = failing_layer(model, x.to(next(model.parameters()).device))
    model.train(was_training)
    if exc is not None:
        where = f"layer {layer} ({type(model.get_submodule(layer)).__name__})" if layer else "its forward"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{spec} cannot run on the calibration images ({'x'.join(map(str, x.shape))}): {where} "
                        f"failed: {type(exc).__name__}: {reason}; check --image-size / --num-classes / --task")


def has_prunable_channels(net: nn.Module, data: Dataset, task: str, say: Callable[[str], None]) -> bool:
    """Whether the model has channels pruning may remove; when it has none, say why (the shrink then quantizes
    only, as a user asking for a smaller file expects, instead of failing)."""
    from compress.prune import ScopeConfig, analyze_scope
    from compress.tasks import get_task

    x = get_task(task).inputs(next(iter(get_task(task).loader(data, 2, shuffle=False))))
    probe = copy.deepcopy(net).eval()
    try:
        analysis = analyze_scope(probe, x.to(next(net.parameters()).device), ScopeConfig())
    except UserError as exc:
        reason = str(exc)
    else:
        if analysis.prunable_units():
            return True
        reason = "; ".join(sorted({u.reason or "" for u in analysis.units})[:3]) or "no conv or linear layers"
    print(f"warning: no channel can be pruned ({reason}); quantizing only", file=sys.stderr, flush=True)
    say("prune: skipped, no prunable channels")
    return False


def build_recipe(config: ShrinkConfig, image_size: int, ref: dict[str, Any]) -> Recipe:
    """The in-memory recipe a shrink runs: prune (+ recover) when asked, then quantize."""
    stages: list[dict[str, Any]] = []
    if config.prune > 0:
        # the recovery re-estimates every BN from scratch, so shifting them first would be work thrown away
        stages.append({"prune": {"target": {"params": config.prune}, "importance": config.prune_importance,
                                 "importance_samples": min(64, config.calib_samples),
                                 "correct_bn": not config.recover}})
        if config.recover:
            stages.append({"recover": {"bn": True, "steps": config.recover_steps, "batch_size": config.batch_size}})
    defaults = SHRINK_JLCM_DEFAULTS if config.method == "jlcm" else {}
    quant = {"method": config.method, "batch_size": config.batch_size, **defaults, **config.quant_options}
    if config.bits is not None:
        quant["bits"] = config.bits
    stages.append({"quantize": quant})
    data_ref = {**ref, "samples": config.calib_samples}
    return parse_recipe({
        "name": "shrink", "seed": config.seed, "task": config.task, "image_size": image_size,
        "model": {"build": config.model, "num_classes": config.num_classes, "checkpoint": config.checkpoint},
        "data": {"train": data_ref, "val": data_ref, "calib": data_ref},
        "train": {"batch_size": config.batch_size, "eval_batch_size": config.batch_size},
        "stages": stages,
    }, source="shrink settings")


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def shrink(checkpoint: str | Path | None | ShrinkConfig, model: str | None = None, out: str | Path | None = None,
           num_classes: int | None = None, task: str = "classification", prune: float = 0.0,
           bits: float | None = 3.0, method: str = "jlcm", calib: str = "digits", calib_samples: int = 64,
           image_size: int | None = None, mean: str | tuple[float, ...] | None = None,
           std: str | tuple[float, ...] | None = None, recover: bool = False,
           recover_steps: int = DEFAULT_RECOVER_STEPS, batch_size: int = 16, seed: int = 0,
           quant_options: dict[str, Any] | None = None, verify: bool = True, quiet: bool = False,
           prune_importance: str = "data",
           printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune (optional), recover, quantize and export `model` (a builder spec) loaded from `checkpoint`
    (None or "none": the builder's random init) into the artifact `out`; returns the figures printed.
    The settings may also come as one `ShrinkConfig` in place of `checkpoint` (then give `out` only).

    prune: share of parameters to remove (0: no pruning); channels are chosen by the share of their readers'
    output they carry on the calibration images, removed channels are replaced by their mean and the BatchNorm
    statistics shifted by what they carried. recover (off by default): after pruning, re-estimate BatchNorm
    statistics on the calibration images and take `recover_steps` output-distillation steps from the unpruned
    model (no labels). bits / method: the quantization target (jlcm: average stored bits per quantized weight) and
    method (jlcm, rtn, kmeans, nf4); quant_options: more options of the method. calib: a data source name
    (its calib split, or SOURCE:SPLIT) or a folder of images; the first `calib_samples` images are used.
    image_size / mean / std override the model's preprocessing. verify: reload the artifact and compare.
    """
    if isinstance(checkpoint, ShrinkConfig):
        config = checkpoint
    else:
        config = ShrinkConfig.from_options(
            model=model, checkpoint=checkpoint, num_classes=num_classes, task=task, prune=prune, bits=bits,
            method=method, calib=calib, calib_samples=calib_samples, image_size=image_size,
            mean=parse_floats(mean, "--mean") if isinstance(mean, str) else mean,
            std=parse_floats(std, "--std") if isinstance(std, str) else std, recover=recover,
            recover_steps=recover_steps, batch_size=batch_size, seed=seed, quant_options=quant_options or {},
            prune_importance=prune_importance)
    if out is None:
        raise UserError("shrink: give the artifact path (out)")
    return run_shrink(config, out, verify=verify, quiet=quiet, printer=printer)


def run_shrink(config: ShrinkConfig, out: str | Path, verify: bool = True, quiet: bool = False,
               printer: Callable[[str], None] = print) -> dict[str, Any]:
    """`shrink` of a validated config: the stages run through the runner's `run_stages`, in memory."""
    from accelerate.utils import set_seed

    from compress.format.artifact import write_artifact
    from compress.stages.export import ExportConfig, artifact_manifest, prepare_for_export
    from compress.evaluate import measure
    from compress.models import build_model
    from compress.tasks import get_task

    start = time.perf_counter()
    say = (lambda _: None) if quiet else printer
    model, checkpoint, task, prune = config.model, config.checkpoint, config.task, config.prune
    out = Path(out).expanduser().resolve()
    if out.suffix != ".safetensors":
        raise UserError(f"-o {out.name}: the artifact is a .safetensors file")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"-o {out}: {out.parent} is not a folder")
    ref = calib_ref(config.calib)
    if checkpoint is not None:
        if Path(checkpoint).expanduser().resolve() == out:
            raise UserError(f"-o {out.name}: that is the input checkpoint; write the artifact to another file")
        read_checked_checkpoint(checkpoint)

    set_seed(config.seed)
    net = build_model(model, num_classes=config.num_classes, checkpoint=checkpoint)
    check_supported(model, net)
    looks_detector = is_detector(net)
    if looks_detector != (task == "detection"):
        kind = "a detector" if looks_detector else "not a detector"
        raise UserError(f"{model} is {kind} but --task is {task}; pass --task "
                        f"{'detection' if looks_detector else 'classification'}")

    from calib import get_dataset

    base_size = None
    if ref["source"] != "folder":
        base_size = getattr(get_dataset(ref["source"], ref["split"], **ref.get("options", {})), "image_size", None)
    elif config.image_size is None:
        base_size = 224
    pre = resolve(model, net, task, base_size, config.image_size, config.mean, config.std)
    if pre.image_size is None:
        raise UserError(f"--image-size is needed: {model} and --calib {config.calib} give no input size")
    ref = with_read_size(ref, pre)
    data = load_calib(ref, pre, task, config.calib_samples)
    check_forward(model, net, data, task)
    where = ref.get("root") or f"{ref['source']}:{ref['split']}"
    labelled = "labels unused" if getattr(data.base, "num_classes", 0) else "unlabelled"
    say(f"model {model} ({'random init' if checkpoint is None else checkpoint}), {config.num_classes} classes, {task}")
    say(f"calibration: {len(data)} images of {where} ({labelled})")
    say(f"preprocessing: {pre.describe()}")

    if prune > 0 and not has_prunable_channels(net, data, task, say):
        prune = 0.0
        config = config.model_copy(update={"prune": 0.0})
    recipe = build_recipe(config, pre.image_size, ref)
    ctx_task = get_task(task)
    before = measure(net, ctx_task.example_input(net, pre.image_size))
    resized = " input (resized inside the model)" if is_torchvision_detector(net) else ""
    say(f"before: {before['params']:,} params, {before['macs']:,} MACs at {pre.image_size}px{resized}, "
        f"{_mb(before['size_bytes'])} ({before['bits_per_weight']:.2f} bits/weight)")

    rows = [("input", before, 0.0)]
    with tempfile.TemporaryDirectory(prefix="compress-shrink-") as run_dir:
        accelerator = make_accelerator()
        ctx = ShrinkContext(recipe=recipe, run_dir=Path(run_dir), accelerator=accelerator, task=ctx_task,
                            calib_data=data, quiet=quiet, printer=printer)
        net = net.to(ctx.device)
        if prune > 0 and config.recover and config.recover_steps > 0:
            ctx.teacher = copy.deepcopy(net).eval().requires_grad_(False)

        def record(net: nn.Module, index: int, name: str, seconds: float) -> None:
            ratio = ctx.stage_metrics.get("params_ratio")
            if name == "prune" and ratio is not None and ratio < 1 - prune - 0.05:
                ctx.warn(f"pruning removed {1 - ratio:.1%} of the parameters, more than the {prune:.0%} asked: "
                         "channels of equal importance are removed together (typical of a random init, whose BN "
                         "scales are all alike)")
            figures = measure(net, ctx.example_input(net))
            ctx.finished.append({"name": name, "metrics": dict(ctx.stage_metrics), **figures,
                                 "seconds": round(seconds, 3)})
            rows.append((name, figures, seconds))

        net = run_stages(net, ctx, [(i, stage.name) for i, stage in enumerate(recipe.stages)], record)
        ctx.teacher = None
        ctx.stage_index, ctx.stage_name = len(recipe.stages), "export"
        fold_start = time.perf_counter()
        net = prepare_for_export(net, ExportConfig(), ctx)
        fold_seconds = time.perf_counter() - fold_start
        manifest = artifact_manifest(ctx)
        manifest["metrics"] = {}  # nothing was evaluated (calibration images may be unlabelled)
        manifest["preprocessing"] = pre.to_dict()
        recovery = "none"
        if prune > 0 and config.recover:
            recovery = "bn" + (f" + {config.recover_steps} distillation steps" if config.recover_steps else "")
        manifest["shrink"] = {"checkpoint": checkpoint, "calib": where, "calib_images": len(data), "prune": prune,
                              "bits": config.bits, "method": config.method, "recover": recovery,
                              "labels_used": False}
        # written beside `out`, verified, then renamed: a failed check leaves nothing at `out`
        partial = out.with_name(f".{out.name}.partial")
        model_file = model[len("file:"):].rsplit(":", 1)[0] if model.startswith("file:") else None
        try:
            check_finite_model(net)
            size = write_artifact(partial, net, manifest)
            if verify:
                verify_diff = _verify(partial, net, data, task, config.batch_size, model_file)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        exported = measure(net, ctx.example_input(net))
        exported.update(size_bytes=size, file_bits_per_param=round(8 * size / max(exported["params"], 1), 4))
        rows.append(("export", exported, fold_seconds))

    after = rows[-1][1]
    plan = getattr(net, "quantization_plan", {}).get("summary", {})
    result = {"out": str(out), "file_bytes": size, "before_bytes": before["size_bytes"],
              "after_bytes": after["size_bytes"], "file_bits_per_param": after["file_bits_per_param"], "params_before": before["params"], "params_after": after["params"],
              "macs_before": before["macs"], "macs_after": after["macs"], "bits_per_weight": after["bits_per_weight"],
              "quantized_bits_per_weight": plan.get("coded_bits_per_weight", plan.get("bits_per_weight")),
              "target_bits": config.bits,
              "ratio": before["size_bytes"] / size, "preprocessing": pre.to_dict(),
              "stages": [{"name": n, **f, "seconds": round(s, 3)} for n, f, s in rows]}
    if verify:
        result["verify_max_diff"] = verify_diff
    result["seconds"] = round(time.perf_counter() - start, 1)
    say(_table(rows))
    if verify:
        say(f"verified: compress.load({out.name}) gives the same outputs (max |diff| {result['verify_max_diff']:.2g})")
    return result


def check_finite_model(model: nn.Module) -> None:
    """No NaN / inf in any float tensor of the model to be written."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() and not bool(tensor.isfinite().all()):
            raise UserError(f"the shrunk model's tensor {name} holds NaN or infinite values (check the checkpoint "
                            "and the calibration images); nothing written")


@torch.no_grad()
def _verify(out: Path, model: nn.Module, data: Dataset, task: str, batch_size: int,
            model_file: str | None = None) -> float:
    """Reload the artifact and compare its outputs with the in-memory model on one calibration batch."""
    from compress.format.artifact import load
    from compress.tasks import get_task

    shown = out.name.removeprefix(".").removesuffix(".partial")
    loader = get_task(task).loader(data, min(batch_size, 4), shuffle=False)
    x = get_task(task).inputs(next(iter(loader)))
    device = next(model.parameters()).device
    reloaded = load(out, device=device, model_file=model_file)
    model.eval()
    with raw_outputs(model), raw_outputs(reloaded):

        want, got = flat_tensors(model(x.to(device))), flat_tensors(reloaded(x.to(device)))
    if not all(bool(t.isfinite().all()) for t in want if t.is_floating_point()):
        raise UserError(f"-o {shown}: the shrunk model gives NaN or infinite outputs on the calibration images "
                        "(check the checkpoint and --mean/--std); nothing written")
    if [t.shape for t in want] != [t.shape for t in got]:
        raise RuntimeError(f"{out}: the reloaded artifact gives outputs of other shapes than the shrunk model")
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got))
    scale = max(a.float().abs().max().item() for a in want)
    if not diff <= 1e-3 * (1 + scale):
        raise RuntimeError(f"{out}: the reloaded artifact differs from the shrunk model (max |diff| {diff:.3g})")
    return diff


def _table(rows: list[tuple[str, dict[str, Any], float]]) -> str:
    # bits/w: every stored tensor (buffers included) per parameter; file bits/p: the artifact's bytes per parameter
    head = f"{'stage':<10} {'params':>12} {'MACs':>15} {'size':>11} {'bits/w':>7} {'file b/p':>8} {'seconds':>8}"
    lines = [head]
    for name, f, s in rows:
        file_bits = f"{f['file_bits_per_param']:.2f}" if "file_bits_per_param" in f else "-"
        lines.append(f"{name:<10} {f['params']:>12,} {f['macs']:>15,} {_mb(f['size_bytes']):>11} "
                     f"{f['bits_per_weight']:>7.2f} {file_bits:>8} {s:>8.1f}")
    return "\n".join(lines)
