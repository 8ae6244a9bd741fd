"""The runner: stages in order, one checkpoint per finished stage, a report, and resume after a kill.

Run directory:
    recipe.yaml                      the resolved recipe (after --set)
    log.txt                          what the console showed, with times
    report.json                      {"recipe", "seed", "task", "stages": [...]}; rewritten atomically
    stages/NN-NAME/model.safetensors tensors + JSON to rebuild the model without pickle
    stages/NN-NAME/metrics.json      the stage's entry of the report (with the checkpoint file's sha256)
    compress.lock                    held (flock) while a run works; names its pid (compress/rundir.py)
The folder must be new, empty or a run's own; bad input (model options, classes, undecodable images) is
found before it is touched, and `--resume` checks every finished checkpoint's SHA-256 and the stored recipe.
A stage counts as finished once its entry is in report.json (written after its files), so `kill -9` at
any moment loses at most the stage in progress. Each stage seeds from (recipe seed, stage index), so a
resumed run gives the same files as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import Dataset, Subset

from compress.format.checkpoint import atomic_write_bytes, atomic_write_json, load_model, save_model
from compress.errors import RunDirError, UserError
from compress.evaluate import measure
from compress.recipe import Recipe
from compress.stages import STAGES
from compress.tasks import Task, get_task

REPORT = "report.json"


def make_accelerator() -> Accelerator:
    """GPU when there is one; otherwise CPU (gloo), which also works under torchrun with N processes."""
    return Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class RunContext:
    """Runtime state of one run, handed to every stage (configs stay frozen and stateless)."""

    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    task: Task
    stage_index: int = -1
    stage_name: str = "setup"
    model_meta: dict[str, Any] = field(default_factory=dict)
    stage_metrics: dict[str, float] = field(default_factory=dict)
    finished: list[dict[str, Any]] = field(default_factory=list)  # report entries of the stages done so far
    file_bytes: int | None = None  # the size of the file a stage wrote (export: the artifact), when it wrote one
    teacher: nn.Module | None = None  # the unpruned model, when the caller keeps it in memory (compress shrink)
    _datasets: dict[str, Dataset] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def stage_seed(self) -> int:
        return self.recipe.seed * 1000 + self.stage_index + 1

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def model_spec(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the stock model (the weights come from the file itself)."""
        return model_spec(self.recipe)

    def stage_dir(self, index: int, name: str) -> Path:
        return self.run_dir / "stages" / f"{index + 1:02d}-{name}"

    def dataset(self, role: str) -> Dataset:
        """The recipe's `train`, `val` or `calib` data (first `samples` items when the recipe says so)."""
        if role not in self._datasets:
            from calib import get_dataset

            ref = getattr(self.recipe.data, role)
            if ref is None:
                raise UserError(f"recipe: data.{role} is needed by stage '{self.stage_name}' but is not set")
            dataset = get_dataset(ref.source, ref.split, root=ref.root, **ref.options)
            if ref.skip >= len(dataset):
                raise UserError(f"recipe: data.{role}.skip is {ref.skip} but {ref.source}:{ref.split} has only "
                                f"{len(dataset)} items")
            stop = len(dataset) if ref.samples is None else min(len(dataset), ref.skip + ref.samples)
            if (ref.skip, stop) != (0, len(dataset)):
                dataset = _with_attrs(Subset(dataset, range(ref.skip, stop)), dataset)
            self._datasets[role] = dataset
        return self._datasets[role]

    def evaluate(self, model: nn.Module, role: str = "val") -> dict[str, float]:
        batches = self.task.loader(self.dataset(role), self.recipe.train.eval_batch_size, shuffle=False)
        return self.task.evaluate(model, batches)

    def example_input(self, model: nn.Module) -> Any:
        return self.task.example_input(model, self.recipe.image_size, self.device)

    def log(self, message: str) -> None:
        """Print on the main process and append to log.txt."""
        if not self.is_main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.run_dir / "log.txt", "a") as handle:
            handle.write(line + "\n")

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A rich progress bar on an interactive main process; a silent counter elsewhere."""
        if not (self.is_main and sys.stderr.isatty()):
            yield lambda **_: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, transient=True) as bar:
            task_id = bar.add_task(description, total=total, info="")

            def advance(**info: float) -> None:
                bar.update(task_id, advance=1, info=" ".join(f"{k}={v:.4g}" for k, v in info.items()))

            yield advance


def _with_attrs(subset: Subset, dataset: Dataset) -> Subset:
    for attr in ("task", "num_classes", "class_names", "image_size"):
        if hasattr(dataset, attr):
            setattr(subset, attr, getattr(dataset, attr))
    return subset


def build_input_model(recipe: Recipe) -> nn.Module:
    from compress.models import build_model

    spec = recipe.model
    return build_model(spec.build, num_classes=spec.num_classes, checkpoint=spec.checkpoint, **spec.options)


def model_spec(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the stock model (the weights come from the file itself)."""
    return {"build": recipe.model.build, "num_classes": recipe.model.num_classes, "options": recipe.model.options}


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / REPORT
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc.__class__.__name__}); remove the run dir or fix the file") from None
    stages = report.get("stages") if isinstance(report, dict) else None
    if not isinstance(stages, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("checkpoint"), str)
            for e in stages):
        raise RunDirError(f"{path}: not a report of `compress run` (expected {{\"stages\": [{{\"name\", "
                          "\"checkpoint\", ...}}]}}); remove the run dir or fix the file")
    return report


def _read_saved_recipe(run_dir: Path) -> dict[str, Any] | None:
    from compress import safe_yaml

    path = run_dir / "recipe.yaml"
    if not path.exists():
        return None
    try:
        saved = safe_yaml.load(path.read_bytes(), str(path))
    except safe_yaml.YAMLInputError as exc:
        raise RunDirError(f"{exc}; the run directory is damaged, start a new --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("stages"), list):
        raise RunDirError(f"{path}: not a resolved recipe (a mapping with stages); the run directory is damaged, "
                          "start a new --out")
    return saved


def planned_stages(recipe: Recipe) -> list[tuple[int, str]]:
    """(index, name) of every report entry: an `input` entry first unless the recipe starts by training."""
    entries = [(i, s.name) for i, s in enumerate(recipe.stages)]
    if recipe.stages[0].name != "finetune":
        entries.insert(0, (-1, "input"))
    return entries


def _check_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> list[dict[str, Any]]:
    """Finished report entries to keep; refuses a run dir that this run must not touch."""
    report = _read_report(run_dir)
    if report is None:
        return []
    done = report.get("stages", [])
    planned = planned_stages(recipe)
    if not resume:
        state = "a finished run" if len(done) >= len(planned) else "an unfinished run"
        raise RunDirError(f"{run_dir} already holds {state}; add --resume to continue it, or choose another --out")
    from compress.rundir import file_sha256, inside

    saved = _read_saved_recipe(run_dir)
    current = recipe.to_dict()
    if saved is None and done:
        raise RunDirError(f"--resume: {run_dir / 'recipe.yaml'} is missing, so the finished stages cannot be matched "
                          "to this recipe; start a new --out")
    if report.get("seed") != recipe.seed:
        raise RunDirError(f"--resume: the run in {run_dir} used seed {report.get('seed')!r}, the recipe says "
                          f"{recipe.seed}; resume with the same recipe, or start a new --out")
    if saved is not None:
        for key in ("model", "task", "data", "seed", "image_size", "train"):
            if saved.get(key) != current.get(key):
                raise RunDirError(f"--resume: recipe field '{key}' differs from the run in {run_dir}; "
                                  "resume with the same recipe, or start a new --out")
    if len(done) > len(planned):
        raise RunDirError(f"--resume: {run_dir} holds {len(done)} finished stages, the recipe plans {len(planned)}; "
                          "start a new --out")
    for entry, (index, name) in zip(done, planned):
        if entry["name"] != name:
            raise RunDirError(f"--resume: finished stage {entry['name']} in {run_dir} is now '{name}' in the recipe")
        if index >= 0 and saved is not None and (index >= len(saved["stages"])
                                                  or saved["stages"][index] != current["stages"][index]):
            raise RunDirError(f"--resume: the config of finished stage {index} ({name}) changed; start a new --out")
        checkpoint = inside(run_dir, entry["checkpoint"], f"report.json stage {name} checkpoint")
        if not checkpoint.is_file():
            raise RunDirError(f"--resume: {checkpoint} is missing; start a new --out")
        if entry.get("sha256") != file_sha256(checkpoint):
            raise RunDirError(f"--resume: {checkpoint} is not the file stage {name} wrote (SHA-256 differs from "
                              "report.json); start a new --out")
    return done[: len(planned)]


def run(recipe: Recipe, run_dir: str | Path, resume: bool = False, accelerator: Accelerator | None = None,
        inputs: list[str | Path] | tuple = ()) -> dict[str, Any]:
    """Run every stage of `recipe` into `run_dir` and return the report. `inputs`: files the run reads (the
    recipe file), which it must never overwrite."""
    from compress import rundir

    run_dir = Path(run_dir)
    accelerator = accelerator or make_accelerator()
    exports = _export_names(recipe, run_dir)
    rundir.check_out(run_dir, exports, [*inputs, recipe.model.checkpoint])
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=accelerator, task=get_task(recipe.task))
    with rundir.claim(run_dir, ctx.is_main) as claimed, torch_threads(recipe.train.threads):
        return _run_claimed(recipe, run_dir, resume, accelerator, ctx, claimed)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count for the block (None: leave it as it is), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export_names(recipe: Recipe, run_dir: Path) -> list[str]:
    """Top-level names the recipe's export stages write (their paths must stay inside the run directory)."""
    from compress.rundir import inside

    names = []
    for i, stage in enumerate(recipe.stages):
        if stage.name == "export":
            rel = inside(run_dir, stage.config.path, f"stages.{i}.export.path")
            names.append(Path(rel).relative_to(run_dir).parts[0])
    return names


def _preflight(recipe: Recipe, ctx: RunContext) -> nn.Module:
    """The input model and the data's classes, checked before the run directory is touched."""
    from compress.models import ModelSpecError

    try:
        model = build_input_model(recipe)
    except TypeError as exc:
        raise ModelSpecError(f"model: {recipe.model.build} does not take these options "
                             f"({' '.join(str(exc).split())[:200]}); check model.options") from None
    for i, stage in enumerate(recipe.stages):  # a teacher checkpoint is read (and checked) now, not stages later
        teacher = getattr(stage.config, "teacher", None) if stage.name == "distill" else None
        if teacher and teacher != "before-prune":
            from compress.format.validate import read_stage_checkpoint

            if not Path(teacher).is_file():
                raise UserError(f"stages.{i}.distill.teacher: {teacher} not found")
            read_stage_checkpoint(teacher, allow_build=recipe.model.build)
    if ctx.is_main:
        for role in ("train", "val"):
            data = ctx.dataset(role)
            classes = getattr(data, "num_classes", 0) or 0
            if classes > recipe.model.num_classes:
                raise UserError(f"model.num_classes is {recipe.model.num_classes} but data.{role} "
                                f"({getattr(recipe.data, role).source}) has {classes} classes; set model.num_classes "
                                f"to at least {classes}")
            check = getattr(data, "check_images", None) or getattr(getattr(data, "dataset", None), "check_images", None)
            if callable(check):
                check()
    return model


def _run_claimed(recipe: Recipe, run_dir: Path, resume: bool, accelerator: Accelerator,
                 ctx: RunContext, claimed: dict[str, bool]) -> dict[str, Any]:
    from compress.rundir import inside

    if not resume and (run_dir / "recipe.yaml").exists() and not (run_dir / REPORT).exists():
        raise RunDirError(f"{run_dir} already holds an unfinished run (no stage finished); add --resume to start it "
                          "again, or choose another --out")
    done = _check_run_dir(recipe, run_dir, resume)
    model = None
    if not done:  # everything that can fail on bad input fails before the first write
        set_seed(recipe.seed)
        model = _preflight(recipe, ctx)
    accelerator.wait_for_everyone()
    if ctx.is_main:
        if (run_dir / "recipe.yaml").exists() and not done:
            saved = _read_saved_recipe(run_dir)
            if saved is not None and saved != recipe.to_dict():
                raise RunDirError(f"--resume: {run_dir / 'recipe.yaml'} is another recipe than this one; start a "
                                  "new --out")
        atomic_write_bytes(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())
    accelerator.wait_for_everyone()
    report = {"recipe": recipe.name, "seed": recipe.seed, "task": recipe.task, "torch_threads": torch.get_num_threads(),
              "stages": list(done)}
    ctx.finished = report["stages"]

    if done:
        last = done[-1]
        model, ctx.model_meta = load_model(inside(run_dir, last["checkpoint"], "checkpoint"),
                                           allow_build=recipe.model.build)
        ctx.log(f"resuming {run_dir} after stage {last['name']} ({len(done)} finished)")
    else:
        ctx.log(f"run {recipe.name}: {recipe.model.build} on {recipe.data.train.source}, "
                f"{accelerator.num_processes} process(es) on {accelerator.device}, {torch.get_num_threads()} torch "
                "thread(s)")
    model = model.to(ctx.device)
    claimed["started"] = True  # from here on, a failure leaves a folder that --resume can continue

    def record(model: nn.Module, index: int, name: str, seconds: float) -> None:
        report["stages"].append(_finish_stage(model, ctx, index, name, seconds))
        if ctx.is_main:
            atomic_write_json(run_dir / REPORT, report)
        accelerator.wait_for_everyone()

    run_stages(model, ctx, planned_stages(recipe)[len(done):], record)
    return report


StageDone = Callable[[nn.Module, int, str, float], None]


def run_stages(model: nn.Module, ctx: RunContext, planned: list[tuple[int, str]], done: StageDone) -> nn.Module:
    """The one stage loop, for recipes and for `compress shrink`: each planned (index, name) is seeded from
    (recipe seed, index), run and timed, then handed to `done(model, index, name, seconds)`, which records it
    (a checkpoint and a report entry for runs; figures in memory for shrink). Index -1 is the input entry."""
    for index, name in planned:
        ctx.stage_index, ctx.stage_name, ctx.stage_metrics, ctx.file_bytes = index, name, {}, None
        set_seed(ctx.stage_seed)
        start = time.perf_counter()
        if index >= 0:
            ctx.log(f"stage {index + 1}/{len(ctx.recipe.stages)}: {name}")
            model = STAGES[name].fn(model, ctx.recipe.stages[index].config, ctx).to(ctx.device)
        done(model, index, name, time.perf_counter() - start)
    return model


def _finish_stage(model: nn.Module, ctx: RunContext, index: int, name: str, seconds: float) -> dict[str, Any]:
    """Evaluate and measure the stage's model, then write its checkpoint and metrics atomically."""
    stage_dir = ctx.stage_dir(index, name)
    metrics = ctx.evaluate(model)
    metrics.update(ctx.stage_metrics)
    figures = measure(model, ctx.example_input(model))
    if ctx.file_bytes is not None:  # the stage's size is its file's, with the file's own bits per parameter
        figures["size_bytes"] = ctx.file_bytes
        figures["file_bits_per_param"] = round(8 * ctx.file_bytes / max(figures["params"], 1), 4)
    entry = {"name": name, "metrics": metrics, **figures,
             "seconds": round(seconds, 3), "checkpoint": str((stage_dir / "model.safetensors").relative_to(ctx.run_dir))}
    if ctx.is_main:
        from compress.rundir import file_sha256

        save_model(stage_dir / "model.safetensors", model, model_spec(ctx.recipe), ctx.model_meta)
        entry["sha256"] = file_sha256(stage_dir / "model.safetensors")  # --resume checks it
        atomic_write_json(stage_dir / "metrics.json", entry)
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    ctx.log(f"stage {name} done in {seconds:.1f}s: {shown} params={entry['params']:,} macs={entry['macs']:,}")
    return entry
