"""The `compress` command line: a thin layer over the Python API.

Exit codes: 0 done, 2 bad input (a user error: recipe, path, option, data, checkpoint; one line on stderr),
1 failure (anything else; one line, the traceback with --debug), 130 interrupted. `--quiet` silences
progress bars and info lines; results (tables, metrics, written paths) are still printed.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

EXAMPLES = """Examples:

  compress run recipes/digits-cls.yaml --out runs/digits-cls

  compress shrink none --model timm:resnet18 --num-classes 10 --bits 3 --calib digits -o r18.safetensors

  compress eval runs/digits-cls/model.safetensors --data digits:val

  compress report runs/digits-cls

  compress sweep model.safetensors --model compress:digits-cnn --bits 2 3 4 --prune 0 0.4 --data digits:val -o runs/sweep

  compress export runs/digits-cls/model.safetensors --onnx model.onnx

  compress inspect compress:yolo-n --groups

Exit codes: 0 done, 2 bad input, 1 failure. Add --debug (before the command) for tracebacks."""

app = typer.Typer(
    name="compress",
    help="Recipe-driven compression of PyTorch detection and classification models.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = {"on": False}
_quiet = {"on": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show the full traceback on errors")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or info lines; results only")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("COMPRESS_DEBUG") == "1"
    _quiet["on"] = quiet


def _is_quiet() -> bool:
    return _quiet["on"]


def _info(message: str) -> None:
    """An info line (stdout), silenced by --quiet."""
    if not _is_quiet():
        print(message, flush=True)


class _NoTTY(io.TextIOBase):
    """stderr as seen by code that draws progress bars only on a terminal: passes text through, says no tty."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Under --quiet: info printed to stdout is dropped and progress bars (drawn on a tty stderr) are off;
    warnings and errors on stderr still show."""
    if not _is_quiet():
        yield
        return
    stderr = sys.stderr
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        sys.stderr = _NoTTY(stderr)
        try:
            yield
        finally:
            sys.stderr = stderr


def _track(items: Iterable[Any], description: str, total: int | None = None) -> Iterable[Any]:
    """A progress bar over `items` on an interactive terminal (not under --quiet); the items otherwise."""
    if _is_quiet() or not sys.stderr.isatty():
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=True)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: stages.0.finetune.epochs=3")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a killed run after its last finished stage")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: the recipe's "
                                                   "train.threads, else one per core); 1 is fastest on a busy machine")] = None,
) -> None:
    """Run every stage of RECIPE into the run directory.

    One line per epoch and per stage (log.txt keeps them), progress bars on a terminal, then a table of
    every stage: metrics, parameters, MACs, size and bits per weight.

    Example: compress run recipes/digits-yolo.yaml --out runs/digits-yolo --set stages.0.finetune.epochs=3

    Example: compress run recipes/digits-yolo.yaml --out runs/digits-yolo --resume
    """
    from compress.pipeline import run as run_pipeline
    from compress.recipe import load_recipe

    recipe_obj = load_recipe(recipe, [*(set_ or []), *([f"train.threads={threads}"] if threads else [])])
    with _quiet_output():
        report = run_pipeline(recipe_obj, out, resume=resume, inputs=[recipe])
    _print_summary(report, out)


def _print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['recipe']} ({out})")
    # bits/w: every stored tensor, buffers included, per parameter; file b/p: the artifact file's bytes per parameter
    for column in ("stage", "metrics", "params", "MACs", "size (MB)", "bits/w", "file b/p", "seconds"):
        table.add_column(column)
    for s in report["stages"]:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in s["metrics"].items())
        file_bits = f"{s['file_bits_per_param']:.2f}" if "file_bits_per_param" in s else "-"
        table.add_row(s["name"], metrics, f"{s['params']:,}", f"{s['macs']:,}", f"{s['size_bytes'] / 1e6:.3f}",
                      f"{s['bits_per_weight']:.2f}", file_bits, f"{s['seconds']:.1f}")
    Console(width=max(140, Console().width)).print(table)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="builder spec (compress:yolo-n, timm:resnet18, ...) or a stage checkpoint")],
    num_classes: Annotated[int, typer.Option(help="classes, when MODEL is a builder spec")] = 10,
    image_size: Annotated[int, typer.Option(help="square input side for the MAC count")] = 128,
    groups: Annotated[bool, typer.Option("--groups", help="print the pruning groups (stride x module family)")] = False,
    model_file: Annotated[Optional[Path], typer.Option("--model-file", help="the Python file of a file: model "
                                                                             "(never taken from the checkpoint)")] = None,
    manifest: Annotated[bool, typer.Option("--manifest", help="for an artifact: print its manifest (indented JSON) "
                                                              "and where the file's bytes go")] = False,
) -> None:
    """Print the layers, parameters and MACs of a model, or its pruning groups, or an artifact's manifest.

    Example: compress inspect compress:yolo-n --image-size 128 --groups

    Example: compress inspect timm:resnet18 --num-classes 10 --image-size 224

    Example: compress inspect runs/yolo/model.safetensors --manifest
    """
    from rich.console import Console
    from rich.table import Table

    if manifest:
        _print_manifest(model)
        return

    from compress.evaluate import measure
    from compress.tasks import get_task

    net = _load_any(model, num_classes, model_file)
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


def _print_manifest(path: str) -> None:
    """The manifest of an artifact as indented JSON, then its byte breakdown (compress.format.breakdown)."""
    import json

    from compress.errors import UserError
    from compress.format.artifact import read_artifact_parts
    from compress.format.breakdown import byte_breakdown, index_coding

    if not Path(path).is_file():
        raise UserError(f"{path}: file not found (--manifest reads an artifact file)")
    _, manifest, layout = read_artifact_parts(path)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    sizes = byte_breakdown(path)
    labels = {"header": "safetensors header", "manifest": "manifest (as stored)",
              "indices_raw": "indices, packed", "indices_coded": "indices, entropy-coded", "codebooks": "codebooks",
              "scales": "scales/offsets/group ids/orders", "biases": "biases", "bn": "batch norm",
              "other_float": "other float tensors", "other": "other tensors"}
    total = sizes["file"]
    index = layout.get("index") or {}
    print(f"\nformat version {sizes['version']}, {len(index.get('tensors', [])) or manifest.get('tensor_count', 0)} "
          f"tensors; bytes of {path}:")
    for key, label in labels.items():
        print(f"  {label:<34} {sizes[key]:>12,}  {100 * sizes[key] / max(total, 1):5.1f}%")
    print(f"  {'file':<34} {total:>12,}")
    for bits, row in index_coding(path).items():
        print(f"  {bits}-bit indices: {row['tensors']} tensors ({row['coded']} entropy-coded), {row['raw']:,} bytes "
              f"packed -> {row['stored']:,} stored")


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
    from compress.models.protocol import is_detector

    return is_detector(net)


def _load_any(spec: str, num_classes: int, model_file: Optional[Path] = None):
    from compress.errors import UserError

    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise UserError(f"{spec}: file not found")
        from compress.format.open import load_any

        return load_any(spec, model_file)[0]
    from compress.models import build_model

    if ":" not in spec:
        raise UserError(f"{spec}: not a builder spec (compress:NAME, timm:NAME, torchvision:NAME, file:path.py:fn) "
                        "nor a .safetensors checkpoint")
    return build_model(spec, num_classes=num_classes)


def _one_line(text: str) -> str:
    """The first non-empty line of a message (tracebacks and multi-line library messages stay out)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first + (" ..." if len(lines) > 1 else "")


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from the click that typer vendors (typer >= 0.20 raises its own copies)."""
    import click.exceptions

    found = [getattr(click.exceptions, name, None)]
    try:
        from typer._click import exceptions as vendored

        found.append(getattr(vendored, name, None))
    except ImportError:
        pass
    if name in ("Exit", "Abort"):
        found.append(getattr(typer, name, None))
    return tuple(c for c in found if isinstance(c, type))


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BYTES = 1 << 30


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system (Linux/glibc only; off with
    COMPRESS_MALLOC=default). Quantizing and calibrating allocate and free the same large tensors over and over;
    by default each block above glibc's threshold (128 KB, adapting up to 32 MB) is a fresh mmap whose pages
    fault in again: on resnet50 that was 14 % of the CPU time, spent in the kernel. Measured on `compress shrink`
    of resnet18 (4 bits, 32 crops, 1 thread): 242 -> 222 s wall, system time 13.6 -> 1.1 s, peak RSS +8 %.
    Returns whether it was applied."""
    if os.environ.get("COMPRESS_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _HEAP_BYTES))


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 done; user errors print one line and exit 2; failures print one line and exit 1
    (the traceback too with --debug or COMPRESS_DEBUG=1); Ctrl-C exits 130."""
    from calib import DataError
    from compress.errors import UserError

    retain_freed_memory()

    _debug["on"] = os.environ.get("COMPRESS_DEBUG") == "1"
    _quiet["on"] = False
    usage, exits = _click_classes("UsageError"), _click_classes("Exit")
    aborts, click_errors = _click_classes("Abort"), _click_classes("ClickException")
    try:
        result = app(args=argv, standalone_mode=False)
    except (UserError, DataError) as exc:
        if _debug["on"]:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except exits as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `compress` alone: the help, as click shows it
            print(exc.format_message(), file=sys.stderr)
            return 2
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "compress"
        print(f"error: {_one_line(exc.format_message())} (see '{where} --help')", file=sys.stderr)
        return 2
    except click_errors as exc:  # e.g. a file click could not open
        print(f"error: {_one_line(exc.format_message())}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1) or 1)
    except (*aborts, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _debug["on"]:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


@app.command(name="eval")
def eval_(
    artifact: Annotated[Path, typer.Argument(help="a .safetensors artifact or stage checkpoint")],
    data: Annotated[str, typer.Option("--data", help="SOURCE:SPLIT, e.g. digits-detect:val")],
    json_: Annotated[bool, typer.Option("--json", help="print the metrics as one JSON object on the last line")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="default: the run's eval batch size")] = None,
    root: Annotated[Optional[str], typer.Option("--root", help="folder or file of a file-based source "
                                                               "(folder, coco, yolo, voc)")] = None,
    model_file: Annotated[Optional[Path], typer.Option("--model-file", help="the Python file of a file: model "
                                                                             "(never taken from the artifact)")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="the original model (an artifact, or a "
                       "checkpoint with --model): report agreement with it instead of accuracy (no labels needed)")] = None,
    model_spec: Annotated[Optional[str], typer.Option("--model", "-m", help="builder spec of the --against checkpoint, "
                     "e.g. torchvision:mobilenet_v2")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="evaluate on the first N images only")] = None,
) -> None:
    """Evaluate an artifact on a data split, in a fresh process, without the recipe.

    Images are prepared as the artifact's manifest says (resize / mean / std of `compress shrink`), else
    passed as the data source gives them. With --against, the compressed model is compared with the original
    on the same images (top-1 agreement, on all and on confident images, top-5 overlap, KL; detectors: F1 of
    the original's boxes), so unlabelled data such as photos:val works.

    Example: compress eval runs/digits-yolo/model.safetensors --data digits-detect:val --json

    Example: compress eval mnv2-4bit.safetensors --data photos:val --against mobilenet_v2.pth -m torchvision:mobilenet_v2
    """
    import json

    from compress.errors import UserError
    from compress.tasks import get_task

    source, sep, split = data.rpartition(":")
    if not sep or not source:
        raise UserError(f"--data {data!r}: write SOURCE:SPLIT, e.g. digits-detect:val")
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")
    if samples is not None and samples <= 0:
        raise UserError(f"--samples must be > 0 (got {samples})")
    model, manifest = _load_for_eval(artifact, model_file)
    task = get_task(manifest["task"])
    raw = _eval_dataset(source, split, samples, root)
    data_task = getattr(raw, "task", None)
    if data_task is not None and data_task != task.name:
        raise UserError(f"--data {data}: a {data_task} source, but {artifact} is a {task.name} model")
    dataset = raw
    if manifest.get("preprocessing"):
        from compress.shrink.data import Prepared
        from compress.shrink.preprocess import Preprocessing

        pre = Preprocessing.from_dict(manifest["preprocessing"])
        dataset = Prepared(raw, pre, task.name)
        _info(f"preprocessing (from the artifact): {pre.describe()}")
    size = batch_size or manifest.get("eval_batch_size", 64)
    loader = task.loader(dataset, size, shuffle=False)
    if against is not None:
        metrics = _fidelity(model, manifest, task, raw, loader, against, model_spec, size, f"{source}:{split}")
    elif getattr(raw, "num_classes", 1) == 0:
        raise UserError(f"--data {data}: the images are unlabelled; pass --against ORIGINAL to measure agreement "
                        "with the original model")
    else:
        metrics = task.evaluate(model, _track(loader, f"eval {source}:{split}", total=len(loader)))
    if json_:
        print(json.dumps(metrics))
    else:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _eval_dataset(source: str, split: str, samples: int | None, root: str | None = None) -> Any:
    """The split; a source that generates as many images as asked (photos) makes `samples` of them."""
    from torch.utils.data import Subset

    from calib import get_dataset
    from calib.registry import source_options

    if samples is not None and "samples" in source_options(source):
        return get_dataset(source, split, root=root, samples=samples)
    dataset = get_dataset(source, split, root=root)
    if samples is not None and samples < len(dataset):
        subset = Subset(dataset, range(samples))
        for name in ("task", "num_classes", "class_names", "image_size"):
            if hasattr(dataset, name):
                setattr(subset, name, getattr(dataset, name))
        return subset
    return dataset


def _fidelity(model: Any, manifest: dict[str, Any], task: Any, raw: Any, loader: Any, against: str,
              model_spec: str | None, batch_size: int, label: str) -> dict[str, float]:
    """Agreement of the compressed `model` with the original `against` on the same images."""
    from compress.errors import UserError
    from compress.evaluate.fidelity import fidelity, load_reference

    classes = (manifest.get("model") or {}).get("num_classes")
    if classes is None:
        classes = _output_classes(model, task, loader)
    original, original_pre = load_reference(against, int(classes), model_spec)
    if manifest.get("task") and _is_detector(original) != (manifest["task"] == "detection"):
        kind = "a detector" if _is_detector(original) else "a classifier"
        raise UserError(f"--against {against}: the original is {kind}, the compressed model is not")
    original_loader = None
    if original_pre and original_pre != manifest.get("preprocessing"):
        from compress.shrink.data import Prepared
        from compress.shrink.preprocess import Preprocessing

        original_loader = task.loader(Prepared(raw, Preprocessing.from_dict(original_pre), task.name), batch_size,
                                      shuffle=False)
    _info(f"against: {against} ({type(original).__name__})")
    return fidelity(model, original, _track(loader, f"eval {label} against the original", total=len(loader)),
                    task.name, original_loader)


def _output_classes(model: Any, task: Any, loader: Any) -> int:
    """Classes of a classifier, from its output on one batch (stage checkpoints carry no manifest)."""
    import torch

    with torch.no_grad():
        return int(model(task.inputs(next(iter(loader)))).shape[-1])


def _load_for_eval(path: Path, model_file: Optional[Path] = None) -> tuple[Any, dict[str, Any]]:
    """(model, manifest) of an artifact, or of a stage checkpoint of a run (task inferred from the model);
    a damaged file is refused with its reader's own reason."""
    from compress.format.artifact import ArtifactError
    from compress.format.open import load_any

    model, manifest = load_any(path, model_file)
    if "format" not in manifest:  # a stage checkpoint
        return model.eval(), {"task": "detection" if _is_detector(model) else "classification"}
    if manifest.get("task") is None:
        raise ArtifactError(f"{path}: the manifest has no task (classification or detection); cannot evaluate")
    return model, manifest


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories of `compress run` (several: side by side), "
                                                        "or a folder of `compress sweep`")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="several runs: the page to write (default: "
                                                                    "report-compare.html here)")] = None,
) -> None:
    """Write RUN_DIR/report.html (self-contained: plots embedded) and the PNGs beside it.

    With several run directories, one page puts them side by side. On the folder of a `compress sweep`,
    redraws its report (the frontier) from sweep.json.

    Example: compress report runs/digits-yolo

    Example: compress report runs/cls-a runs/cls-b -o compare.html
    """
    from compress.evaluate.report import write_report

    with _quiet_output():
        if len(run_dirs) > 1:
            from compress.evaluate.report import write_comparison

            path = write_comparison(run_dirs, out or Path("report-compare.html"))
        elif (run_dirs[0] / "sweep.json").is_file() and not (run_dirs[0] / "report.json").is_file():
            from compress.evaluate.frontier import write_sweep_report

            path = write_sweep_report(run_dirs[0])
        else:
            path = write_report(run_dirs[0])
    print(path)


@app.command(epilog="Examples:\n\n"
             "  compress shrink none --model timm:resnet18 --num-classes 10 --bits 3 --calib digits -o r18.safetensors\n\n"
             "  compress shrink none --model torchvision:ssdlite320_mobilenet_v3_large --task detection "
             "--num-classes 11 --bits 3 --calib digits-detect -o ssd.safetensors\n\n"
             "  compress shrink model.pt --model compress:digits-cnn --num-classes 10 --prune 0.5 --bits 3 "
             "--calib ./my_images -o small.safetensors")
def shrink(
    checkpoint: Annotated[str, typer.Argument(help="a .safetensors file or a torch.save'd state dict (read with "
                                                   "weights_only=True); 'none': the builder's random init")],
    model: Annotated[str, typer.Option("--model", "-m", help="builder spec: timm:NAME, torchvision:NAME, compress:NAME, "
                                                             "file:path.py:fn")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the artifact to write (.safetensors)")],
    num_classes: Annotated[int, typer.Option("--num-classes", help="classes of the checkpoint's head (torchvision "
                                                                   "detectors: + background)")],
    task: Annotated[str, typer.Option("--task", help="classification or detection")] = "classification",
    prune: Annotated[float, typer.Option("--prune", help="share of parameters to remove by channel pruning "
                                                         "(|gamma| / magnitude importance); 0: no pruning")] = 0.0,
    bits: Annotated[float, typer.Option("--bits", help="average stored bits per quantized weight, codebooks and "
                                                       "maps included (jlcm: mixed precision, refused when it "
                                                       "cannot be met; rtn/kmeans: whole bits per layer)")] = 3.0,
    method: Annotated[str, typer.Option("--method", help="quantization method: jlcm, rtn, kmeans, nf4")] = "jlcm",
    calib: Annotated[str, typer.Option("--calib", help="calibration images: a data source (its calib split, or "
                                                       "SOURCE:SPLIT) or a folder of images; labels not needed")] = "digits",
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="calibration images used")] = 64,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="square input side (default: what the "
                                                                           "model expects)")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406 "
                                                               "(default: what the model expects)")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="normalisation std, e.g. 0.229,0.224,0.225")] = None,
    recover: Annotated[bool, typer.Option("--recover/--no-recover", help="after pruning: re-estimate BatchNorm "
                                                                         "statistics and distill on the calibration "
                                                                         "images (off by default: on a pretrained "
                                                                         "model it lost more than it regained)")] = False,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="output-distillation steps after pruning")] = 100,
    prune_importance: Annotated[str, typer.Option("--prune-importance", help="data: channels scored on the "
                                                  "calibration images by the share of their readers' output they "
                                                  "carry; bn: |gamma| (sparse-trained models)")] = "data",
    batch_size: Annotated[int, typer.Option("--batch-size", help="calibration batch size")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quant_option: Annotated[Optional[list[str]], typer.Option(
        "--quant-option", help="an option of the quantization method, KEY=VALUE (the value read as YAML), e.g. "
                               "bn_views_steps=20 or column_scale=0.5; repeatable (docs/ARCHITECTURE.md lists "
                               "the modules; `compress.quant` config classes hold every option)")] = None,
) -> None:
    """Shrink a checkpoint in one command: prune, recover, quantize (JLCM), write one artifact.

    Calibration images are prepared as the model expects (timm data config, torchvision ImageNet
    normalisation, our own models take [0, 1] images); the output says which. Prints the size before and
    after and the bits per weight, then checks that compress.load(OUT) gives the same outputs.
    """
    from compress.shrink import shrink as run_shrink

    if recover_steps < 0:
        from compress.errors import UserError

        raise UserError(f"--recover-steps must be >= 0 (got {recover_steps})")
    from compress.recipe import apply_overrides

    quant_options = apply_overrides({}, quant_option or [], "--quant-option", "bn_views_steps=20")
    for key, flag in (("bits", "--bits"), ("method", "--method")):
        if key in quant_options:
            from compress.errors import UserError

            raise UserError(f"--quant-option {key}: give it as {flag}, which sets it for the whole shrink")
    with _quiet_output():
        result = run_shrink(checkpoint, model, out, num_classes, task=task, prune=prune, bits=bits, method=method,
                            calib=calib, calib_samples=calib_samples, image_size=image_size, mean=mean, std=std,
                            recover=recover, recover_steps=recover_steps, batch_size=batch_size, seed=seed,
                            quiet=_is_quiet(), prune_importance=prune_importance, quant_options=quant_options)
    print(f"wrote {out}: {result['file_bytes']:,} bytes (fp32 {result['before_bytes'] / 1e6:.2f} MB -> "
          f"{result['file_bytes'] / 1e6:.3f} MB file, {result['ratio']:.1f}x smaller), "
          f"{result['bits_per_weight']:.2f} bits/weight (every tensor), {result['file_bits_per_param']:.2f} file "
          f"bits/param" + (f" ({result['quantized_bits_per_weight']:.2f} per quantized weight)"
             if result.get("quantized_bits_per_weight") is not None else "")
          + f", {result['params_after']:,} params, {result['seconds']:.0f} s")


@app.command(epilog="Examples:\n\n"
             "  compress export runs/digits-yolo/model.safetensors --onnx yolo.onnx\n\n"
             "  compress export runs/digits-yolo/model.safetensors --onnx yolo-dense.onnx --dense")
def export(
    artifact: Annotated[Path, typer.Argument(help="a .safetensors artifact (compress run's export, compress shrink)")],
    onnx: Annotated[Path, typer.Option("--onnx", help="the ONNX file to write")],
    dense: Annotated[bool, typer.Option("--dense", help="plain dense weights instead of packed indices + codebooks")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Export an artifact to ONNX for phones and edge runtimes.

    The graph keeps the compressed form (packed indices and codebooks as initializers, unpacked inside
    the graph) unless --dense asks for plain weights. Prints the file's size and its ratio to the artifact.
    """
    from compress.errors import UserError

    if not artifact.is_file():
        raise UserError(f"{artifact}: file not found")
    if onnx.expanduser().resolve() == artifact.expanduser().resolve():
        raise UserError(f"--onnx {onnx}: that is the input artifact; write the ONNX file elsewhere")
    try:
        from compress.onnx import export_onnx
    except ImportError as exc:
        raise RuntimeError(f"ONNX export is not available in this install ({exc})") from exc
    with _quiet_output():
        result = export_onnx(artifact, onnx, dense=dense, **({"opset": opset} if opset is not None else {}))
    print(_export_line(result if isinstance(result, dict) else {"path": str(result)}, onnx, dense))


def _export_line(result: dict[str, Any], onnx: Path, dense: bool) -> str:
    """`wrote m.onnx: 77,937 bytes, 1.17x the artifact (66,408 bytes), opset 18, 59 quantized layers packed`."""
    parts = [f"wrote {result.get('path', onnx)}"]
    details = []
    if isinstance(result.get("bytes"), int):
        details.append(f"{result['bytes']:,} bytes")
    if isinstance(result.get("ratio"), (int, float)):
        against = result.get("artifact_bytes")
        details.append(f"{result['ratio']:.2f}x the artifact" + (f" ({against:,} bytes)" if isinstance(against, int) else ""))
    if result.get("opset") is not None:
        details.append(f"opset {result['opset']}")
    if dense:
        details.append("dense weights")
    elif isinstance(result.get("quantized_layers"), int):
        details.append(f"{result['quantized_layers']} quantized layers kept packed")
    return parts[0] + (": " + ", ".join(details) if details else "")


def _list_command_class() -> type:
    """A command whose list options take several values after one flag (`--bits 2 2.5 3 4`, or `--bits 2,3`):
    the values are spread into repeated flags before click parses them."""
    from typer.core import TyperCommand

    class ListOptionsCommand(TyperCommand):
        list_options = ("--bits", "--prune", "--methods")

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            import re

            number = re.compile(r"^-?\d*\.?\d+(e-?\d+)?$")
            spread: list[str] = []
            flag, got = None, 0

            def add(text: str) -> int:
                values = [v for v in text.split(",") if v]
                for v in values:
                    spread.extend((flag, v))
                return len(values)

            for arg in args:
                name, eq, value = arg.partition("=")
                if name in self.list_options:
                    if flag is not None and not got:
                        spread.extend((flag, ""))  # a list flag with no value: the empty-grid message
                    flag, got = name, add(value) if eq else 0
                    continue
                if flag is not None and (not arg.startswith("-") or number.match(arg)):
                    got += add(arg)
                    continue
                if flag is not None and not got:
                    spread.extend((flag, ""))
                flag = None
                spread.append(arg)
            if flag is not None and not got:
                spread.extend((flag, ""))
            return super().parse_args(ctx, spread)

    return ListOptionsCommand


@app.command(cls=_list_command_class(), epilog="Examples:\n\n"
             "  compress sweep runs/cls/stages/01-finetune/model.safetensors --model compress:digits-cnn "
             "--bits 2 2.5 3 4 --prune 0 0.4 --methods jlcm rtn kmeans nf4 --calib digits --data digits:val "
             "-o runs/sweep\n\n"
             "  compress sweep runs/cls/stages/01-finetune/model.safetensors --recipe recipes/digits-cls.yaml "
             "--bits 2 3 4 -o runs/sweep")
def sweep(
    checkpoint: Annotated[str, typer.Argument(help="a .safetensors file or a torch.save'd state dict; 'none': the "
                                                   "builder's random init")],
    out: Annotated[Path, typer.Option("--out", "-o", help="sweep folder: sweep.json, report.html, points/")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="builder spec: compress:NAME, timm:NAME, "
                                                                       "...")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="evaluation split, SOURCE:SPLIT: labelled (e.g. "
                                                               "digits:val: the task's metric) or not (e.g. "
                                                               "photos:val: agreement with the original)")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="take --model, --num-classes, --task, --calib "
                                                                    "and --data from a recipe (its calib and val "
                                                                    "splits) unless given")] = None,
    bits: Annotated[Optional[list[str]], typer.Option("--bits", metavar="BITS...", help="bit-widths, e.g. --bits 2 2.5 3 4 (jlcm: "
                                                                    "average bits per weight; others: whole bits)")] = None,
    prune: Annotated[Optional[list[str]], typer.Option("--prune", metavar="SHARE...", help="shares of parameters to prune, e.g. "
                                                                      "--prune 0 0.2 0.4")] = None,
    methods: Annotated[Optional[list[str]], typer.Option("--methods", metavar="METHOD...", help="quantization methods: jlcm rtn "
                                                                          "kmeans nf4 (default: all four)")] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="calibration images: a data source or a folder "
                                                                 "(default: digits)")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="classes of the checkpoint's head "
                                                                             "(default: those of --data)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="classification or detection (default: that of "
                                                               "--data)")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="calibration images used")] = 64,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="output-distillation steps after pruning")] = 100,
    tolerance: Annotated[float, typer.Option("--tolerance", help="recommend the smallest point within this many "
                                                                 "points of the original's metric")] = 1.0,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="square input side (default: what "
                                                                           "the model expects)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Shrink a checkpoint at every point of a grid (method x bits x prune), evaluate each artifact, and draw
    the accuracy-vs-size Pareto frontier against the baselines in OUT/report.html. On a labelled split the metric
    is the task's (top1, map50); on an unlabelled one (photos:val) it is agreement with the original model
    (confident_agreement, box_f1), as `compress eval --against` measures it.

    Every point runs as `compress shrink` does and is cached in OUT/points/: run the same command again to
    resume a killed sweep (finished points are not redone). Settings a method cannot take (rtn at 2.5 bits,
    nf4 at anything but 4) are recorded as skipped, with the reason.
    """
    from compress.errors import UserError
    from compress.sweep import SweepConfig, run_sweep

    def numbers(values: list[str] | None, option: str, default: tuple[float, ...]) -> tuple[float, ...]:
        if values is None:
            return default
        try:
            return tuple(float(v) for v in values if v != "")
        except ValueError:
            bad = next(v for v in values if not _is_number(v))
            raise UserError(f"{option} {bad!r}: not a number") from None

    if bits is None:
        raise UserError("--bits is needed: the bit-widths of the grid, e.g. --bits 2 3 4")
    if recipe is not None:
        from compress.sweep.config import options_from_recipe

        base = options_from_recipe(str(recipe))
        model, data, calib = model or base["model"], data or base["data"], calib or base["calib"]
        num_classes, task = num_classes or base["num_classes"], task or base["task"]
    if model is None or data is None:
        raise UserError(f"{'--model' if model is None else '--data'} is needed (or --recipe to take it from a recipe)")
    calib = calib or "digits"
    if Path(data).expanduser().is_dir():
        from compress.sweep.run import folder_refused

        raise folder_refused(data)
    if task is None or num_classes is None:
        from calib import get_dataset

        source, _, split = data.rpartition(":")
        if not source:
            raise UserError(f"--data {data!r}: write SOURCE:SPLIT, e.g. digits:val")
        found = get_dataset(source, split)
        task = task or getattr(found, "task", "classification")
        num_classes = num_classes or getattr(found, "num_classes", 0) or None
        if num_classes is None:
            raise UserError(f"--num-classes is needed: --data {data} does not say how many classes")
    config = SweepConfig.from_options(
        model=model, checkpoint=checkpoint, num_classes=num_classes, task=task,
        bits=numbers(bits, "--bits", ()), prune=numbers(prune, "--prune", (0.0,)),
        methods=tuple(m for m in (methods if methods is not None else ["jlcm", "rtn", "kmeans", "nf4"]) if m),
        calib=calib, data=data, calib_samples=calib_samples, recover_steps=recover_steps, tolerance=tolerance,
        image_size=image_size, seed=seed)
    with _quiet_output():
        result = run_sweep(config, out, quiet=_is_quiet())
    print(result["report"])
    if result.get("failed"):
        print(f"error: {result['failed']} point(s) failed (see {out / 'sweep.json'})", file=sys.stderr)
        raise typer.Exit(1)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
