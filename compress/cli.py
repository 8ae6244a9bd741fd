"""The `compress` command line: a thin layer over the Python API."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="compress",
    help="Recipe-driven compression of PyTorch detection and classification models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = {"on": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show the full traceback on errors")] = False) -> None:
    _debug["on"] = debug or os.environ.get("COMPRESS_DEBUG") == "1"


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: stages.0.finetune.epochs=3")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a killed run after its last finished stage")] = False,
) -> None:
    """Run every stage of RECIPE into the run directory.

    Example: compress run recipes/digits-yolo.yaml --out runs/digits-yolo --set stages.0.finetune.epochs=3
    """
    from compress.pipeline import run as run_pipeline
    from compress.recipe import load_recipe

    recipe_obj = load_recipe(recipe, set_ or [])
    report = run_pipeline(recipe_obj, out, resume=resume)
    _print_summary(report, out)


def _print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['recipe']} ({out})")
    for column in ("stage", "metrics", "params", "MACs", "size (MB)", "bits/w", "seconds"):
        table.add_column(column)
    for s in report["stages"]:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in s["metrics"].items())
        table.add_row(s["name"], metrics, f"{s['params']:,}", f"{s['macs']:,}", f"{s['size_bytes'] / 1e6:.3f}",
                      f"{s['bits_per_weight']:.2f}", f"{s['seconds']:.1f}")
    Console(width=max(140, Console().width)).print(table)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="builder spec (compress:yolo-n, timm:resnet18, ...) or a stage checkpoint")],
    num_classes: Annotated[int, typer.Option(help="classes, when MODEL is a builder spec")] = 10,
    image_size: Annotated[int, typer.Option(help="square input side for the MAC count")] = 128,
    groups: Annotated[bool, typer.Option("--groups", help="print the pruning groups (stride x module family)")] = False,
) -> None:
    """Print the layers, parameters and MACs of a model, or its pruning groups.

    Example: compress inspect compress:yolo-n --image-size 128 --groups
    """
    from rich.console import Console
    from rich.table import Table

    from compress.evaluate import measure
    from compress.tasks import get_task

    net = _load_any(model, num_classes)
    task = get_task("detection" if _is_detector(net) else "classification")
    if groups:
        _print_groups(net, task.example_input(net, image_size), model)
        return
    table = Table(title=model)
    for column in ("layer", "type", "shape", "params"):
        table.add_column(column)
    for name, module in net.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            weight = getattr(module, "weight", None)
            shape = "x".join(map(str, weight.shape)) if weight is not None else ""
            table.add_row(name, type(module).__name__, shape, f"{sum(p.numel() for p in own):,}")
    console = Console()
    console.print(table)
    figures = measure(net, task.example_input(net, image_size))
    console.print(f"params {figures['params']:,}  MACs {figures['macs']:,} at {image_size}x{image_size}  "
                  f"size {figures['size_bytes'] / 1e6:.3f} MB  bits/weight {figures['bits_per_weight']:.2f}")


def _print_groups(net, example_input, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from compress.prune import describe_groups

    table = Table(title=f"pruning groups of {title}")
    for column in ("group", "stride", "layers", "channels", "mean |gamma|", "first layer", "note"):
        table.add_column(column, no_wrap=column != "note")
    for row in describe_groups(net, example_input):
        table.add_row(str(row["group"]), str(row["stride"]), str(row["layers"]), str(row["channels"]),
                      f"{row['mean_score']:.3g}" if row.get("mean_score") is not None else "",
                      (row.get("examples") or [""])[0], row.get("note") or "")
    Console(width=max(120, Console().width)).print(table)


def _is_detector(net) -> bool:
    from compress.tasks.detection import is_tensor_protocol

    return is_tensor_protocol(net) or type(net).__module__.startswith("torchvision.models.detection")


def _load_any(spec: str, num_classes: int):
    from compress.errors import UserError

    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise UserError(f"{spec}: file not found")
        from compress.checkpoint import load_model

        return load_model(spec)[0]
    from compress.models import build_model

    if ":" not in spec:
        raise UserError(f"{spec}: not a builder spec (compress:NAME, timm:NAME, torchvision:NAME, file:path.py:fn) "
                        "nor a .safetensors checkpoint")
    return build_model(spec, num_classes=num_classes)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; bugs exit 1."""
    from calib import DataError
    from compress.errors import UserError

    try:
        app(args=argv, standalone_mode=False)
    except (UserError, DataError) as exc:
        if _debug["on"]:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (typer.Exit, SystemExit) as exc:
        return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except Exception as exc:  # click usage errors come through here
        import click

        if isinstance(exc, click.exceptions.UsageError):
            exc.show()
            return 2
        if isinstance(exc, click.exceptions.Abort):
            return 130
        if _debug["on"]:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


@app.command(name="eval")
def eval_(
    artifact: Annotated[Path, typer.Argument(help="a .safetensors artifact or stage checkpoint")],
    data: Annotated[str, typer.Option("--data", help="SOURCE:SPLIT, e.g. digits-detect:val")],
    json_: Annotated[bool, typer.Option("--json", help="print the metrics as one JSON object on the last line")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="default: the run's eval batch size")] = None,
) -> None:
    """Evaluate an artifact on a data split, in a fresh process, without the recipe.

    Example: compress eval runs/digits-yolo/model.safetensors --data digits-detect:val --json
    """
    import json

    from calib import get_dataset
    from compress.artifact import load, read_artifact
    from compress.errors import UserError
    from compress.tasks import get_task

    source, sep, split = data.rpartition(":")
    if not sep or not source:
        raise UserError(f"--data {data!r}: write SOURCE:SPLIT, e.g. digits-detect:val")
    _, manifest = read_artifact(artifact)
    model = load(artifact)
    task = get_task(manifest["task"])
    loader = task.loader(get_dataset(source, split), batch_size or manifest.get("eval_batch_size", 64), shuffle=False)
    metrics = task.evaluate(model, loader)
    if json_:
        print(json.dumps(metrics))
    else:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory of `compress run`")]) -> None:
    """Write RUN_DIR/report.html (self-contained: plots embedded) and the PNGs beside it.

    Example: compress report runs/digits-yolo
    """
    from compress.evaluate.report import write_report

    print(write_report(run_dir))
