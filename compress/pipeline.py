"""The runner: stages in order, one checkpoint per finished stage, a report, and resume after a kill.

Run directory:
    recipe.yaml                      the resolved recipe (after --set)
    log.txt                          what the console showed, with times
    report.json                      {"recipe", "seed", "task", "stages": [...]}; rewritten atomically
    stages/NN-NAME/model.safetensors tensors + JSON to rebuild the model without pickle
    stages/NN-NAME/metrics.json      the stage's entry of the report
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
    file_overhead_bytes: int = 0  # bytes a stage's output file holds beyond the tensors (artifact header)
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
            if ref.samples is not None and ref.samples < len(dataset):
                dataset = _with_attrs(Subset(dataset, range(ref.samples)), dataset)
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
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc}); remove the run dir or fix the file") from None


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
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").exists() else None
    current = recipe.to_dict()
    if saved is not None:
        for key in ("model", "task", "data", "seed", "image_size", "train"):
            if saved.get(key) != current.get(key):
                raise RunDirError(f"--resume: recipe field '{key}' differs from the run in {run_dir}; "
                                  "resume with the same recipe, or start a new --out")
    for entry, (index, name) in zip(done, planned):
        if entry["name"] != name:
            raise RunDirError(f"--resume: finished stage {entry['name']} in {run_dir} is now '{name}' in the recipe")
        if index >= 0 and saved is not None and saved["stages"][index] != current["stages"][index]:
            raise RunDirError(f"--resume: the config of finished stage {index} ({name}) changed; start a new --out")
        if not (run_dir / entry["checkpoint"]).exists():
            raise RunDirError(f"--resume: {run_dir / entry['checkpoint']} is missing; start a new --out")
    return done[: len(planned)]


def run(recipe: Recipe, run_dir: str | Path, resume: bool = False, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Run every stage of `recipe` into `run_dir` and return the report."""
    run_dir = Path(run_dir)
    accelerator = accelerator or make_accelerator()
    done = _check_run_dir(recipe, run_dir, resume)
    accelerator.wait_for_everyone()
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=accelerator, task=get_task(recipe.task))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())
    accelerator.wait_for_everyone()
    report = {"recipe": recipe.name, "seed": recipe.seed, "task": recipe.task, "stages": list(done)}
    ctx.finished = report["stages"]

    if done:
        last = done[-1]
        model, ctx.model_meta = load_model(run_dir / last["checkpoint"])
        ctx.log(f"resuming {run_dir} after stage {last['name']} ({len(done)} finished)")
    else:
        set_seed(recipe.seed)
        model = build_input_model(recipe)
        ctx.log(f"run {recipe.name}: {recipe.model.build} on {recipe.data.train.source}, "
                f"{accelerator.num_processes} process(es) on {accelerator.device}")
    model = model.to(ctx.device)

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
        ctx.stage_index, ctx.stage_name, ctx.stage_metrics, ctx.file_overhead_bytes = index, name, {}, 0
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
    figures["size_bytes"] += ctx.file_overhead_bytes
    entry = {"name": name, "metrics": metrics, **figures,
             "seconds": round(seconds, 3), "checkpoint": str((stage_dir / "model.safetensors").relative_to(ctx.run_dir))}
    if ctx.is_main:
        save_model(stage_dir / "model.safetensors", model, model_spec(ctx.recipe), ctx.model_meta)
        atomic_write_json(stage_dir / "metrics.json", entry)
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    ctx.log(f"stage {name} done in {seconds:.1f}s: {shown} params={entry['params']:,} macs={entry['macs']:,}")
    return entry
