"""`compress report RUN_DIR [RUN_DIR ...]`: a self-contained HTML page (plots as data URIs) and PNGs beside it.

Reads only what a run leaves on disk: report.json, and the stage checkpoints' headers (tensor shapes and
JSON metadata), so it works on a finished or a killed run and never loads weights. Layers are listed in
model order: the order of the model's modules, from its architecture built on the meta device (no memory, no
weights), else the quantization plan's call order.

One run: RUN_DIR/report.html, accuracy_vs_size.png, time_per_stage.png, layers.png. Several runs: one page
with the runs side by side (`write_comparison`).
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from compress.errors import RunDirError
from compress.format.checkpoint import atomic_write_bytes
from compress.evaluate.frontier import OTHER_COLOURS, STYLE, image_tag
from compress.evaluate.plotting import (
    format_bytes,
    label_overlaps,
    place_labels,
    png,
    pyplot,
    size_axis,
)

SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7") + OTHER_COLOURS


def _read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, Any], dict[str, Any]]:
    """Tensor shapes, model_spec and model_meta of a stage checkpoint, from its header only."""
    from safetensors import safe_open

    from compress.format.validate import read_stage_checkpoint

    _, spec, meta = read_stage_checkpoint(path, allow_build="*")  # every check of a load, nothing built
    with safe_open(str(path), framework="pt") as handle:
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return shapes, spec, meta


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def model_order(spec: dict[str, Any]) -> list[str]:
    """Module names in the model's own order (its architecture on the meta device); [] if it cannot be built.
    A `file:` model is never built from what a run directory says (that would run the file's code)."""
    if str(spec.get("build", "")).startswith("file:"):
        return []
    try:
        import torch

        from compress.models import build_model

        with torch.device("meta"):
            net = build_model(spec["build"], num_classes=spec["num_classes"], **spec.get("options", {}))
        return [name for name, _ in net.named_modules()]
    except Exception:
        return []


def layer_table(run_dir: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer, in model order: output channels in the baseline and at the end, the bits its weight is
    stored with and the sensitivity measured for those bits (mixed precision: output error), if any."""
    from compress.rundir import inside

    base_shapes, spec, _ = _read_header(inside(run_dir, stages[0]["checkpoint"], "report.json stages.0.checkpoint"))
    last_shapes, _, last_meta = _read_header(inside(run_dir, stages[-1]["checkpoint"], "report.json checkpoint"))
    plan_layers = (last_meta.get("quantization") or {}).get("layers") or []
    quant = {entry["name"]: {**entry.get("layout", {}), "bits": entry.get("bits"),
                             "sensitivity": entry.get("sensitivity"), "error": entry.get("error")}
             for entry in plan_layers if entry.get("attr", "weight") == "weight"}
    rows = []
    for name, shape in base_shapes.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        layer = name[: -len(".weight")]
        layout = quant.get(layer)
        final = last_shapes.get(name) or (layout or {}).get("shape")
        if final is None and f"{layer}.weight_packed" in last_shapes:
            final = [last_shapes[f"{layer}.weight_packed"][0]]
        bits = (layout or {}).get("bits", 32 if name in last_shapes else None)
        rows.append({"layer": layer, "channels": shape[0], "kept": final[0] if final else None, "bits": bits,
                     "sensitivity": (layout or {}).get("sensitivity"), "weights": int(math.prod(shape))})
    order = {name: i for i, name in enumerate(model_order(spec) if spec else [])}
    plan_order = {entry["name"]: i for i, entry in enumerate(plan_layers)}
    if all(r["layer"] in order for r in rows):
        rows.sort(key=lambda r: order[r["layer"]])
    else:
        rows.sort(key=lambda r: (plan_order.get(r["layer"], len(plan_order)), _natural(r["layer"])))
    return rows


def _groups(stages: list[dict[str, Any]], metric: str) -> list[tuple[float, float, list[str]]]:
    """Consecutive stages at the same (size, metric) merged: one point, its stage names in run order."""
    points: list[tuple[float, float, list[str]]] = []
    for s in stages:
        x, y = s["size_bytes"], s["metrics"].get(metric, float("nan"))
        if points and points[-1][0] == x and (points[-1][1] == y or (math.isnan(y) and math.isnan(points[-1][1]))):
            points[-1][2].append(s["name"])
        else:
            points.append((x, y, [s["name"]]))
    return points


def _metric(report: dict[str, Any]) -> str:
    return "map50" if report.get("task") == "detection" else "top1"


def accuracy_figure(runs: list[tuple[str, dict[str, Any]]]) -> tuple[Any, list[Any]]:
    """Metric against in-memory size: each stage a point, arrows in run order, one colour per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    metric = _metric(runs[0][1])
    all_sizes = [s["size_bytes"] for _, r in runs for s in r["stages"]]
    size_axis(ax, all_sizes, pad=1.6)
    anchors, texts = [], []
    ys = []
    for i, (name, report) in enumerate(runs):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = [p for p in _groups(report["stages"], metric) if not math.isnan(p[1])]
        xs, vs = [p[0] for p in points], [p[1] for p in points]
        ys += vs
        ax.scatter(xs, vs, color=colour, s=36, zorder=3,
                   label=f"{chr(ord('a') + i % 26)}: {name}" if len(runs) > 1 else None)
        for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,
                        arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.2, shrinkA=5, shrinkB=5,
                                        mutation_scale=11, connectionstyle="arc3,rad=0.12"))
        tag = chr(ord("a") + i % 26) if len(runs) > 1 else ""  # several runs: a1, a2, ... b1, ...
        for step, (x, y, names) in enumerate(points, 1):
            anchors.append((x, y))
            texts.append(f"{tag}{step}. {' > '.join(names)}")
    if ys:
        lo, hi = min(ys), max(ys)
        span = max(hi - lo, 0.02)
        ax.set_ylim(lo - 0.12 * span, hi + 0.2 * span)
    ax.set_xlabel("model size (parameters + buffers as stored; log scale)")
    ax.set_ylabel(metric)
    ax.set_title("accuracy vs size, stages in run order")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    labels = place_labels(ax, anchors, texts, fontsize=8)
    return fig, labels


def layers_figure(layers: list[dict[str, Any]]) -> Any:
    """Per layer in model order: baseline and kept output channels; stored bits and measured sensitivity."""
    plt = pyplot()
    width = max(7.0, 0.32 * len(layers) + 2)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.2), sharex=True, height_ratios=(1.3, 1))
    xs = list(range(len(layers)))
    top.bar(xs, [l["channels"] for l in layers], color="#ccc", label="baseline channels")
    top.bar(xs, [l["kept"] or 0 for l in layers], color="#0072B2", width=0.55, label="kept channels")
    top.set_ylabel("output channels")
    top.legend(fontsize=8, loc="upper left")
    top.set_title("layers in model order: kept channels, bits, sensitivity")
    top.grid(axis="y", alpha=0.3)
    bits = [l["bits"] if l["bits"] is not None and l["bits"] < 32 else 0 for l in layers]
    bottom.bar(xs, bits, color="#D55E00", width=0.55, label="bits per weight index")
    bottom.set_ylabel("bits (0: kept fp32)")
    bottom.set_ylim(0, max(bits + [4]) + 1)
    bottom.grid(axis="y", alpha=0.3)
    sens = [l.get("sensitivity") for l in layers]
    handles, names = bottom.get_legend_handles_labels()
    if any(s for s in sens):
        twin = bottom.twinx()
        twin.plot(xs, [s if s else float("nan") for s in sens], "k.--", lw=0.8, ms=6,
                  label="sensitivity (output error at its bits)")
        twin.set_yscale("log")
        twin.set_ylabel("sensitivity")
        h2, n2 = twin.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    bottom.legend(handles, names, fontsize=8, loc="upper left")
    bottom.set_xticks(xs)
    bottom.set_xticklabels([l["layer"] for l in layers], rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def _plots(report: dict[str, Any], layers: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    plt = pyplot()
    plots: dict[str, bytes] = {}
    fig, labels = accuracy_figure([(name, report)])
    overlaps = label_overlaps(fig, labels + fig.axes[0].get_xticklabels())
    if overlaps:
        import warnings

        warnings.warn(f"accuracy plot: labels overlap: {overlaps[:3]}", stacklevel=2)
    plots["accuracy_vs_size.png"] = png(fig)
    plt.close(fig)

    stages = report["stages"]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(stages) + 1.2))
    ax.barh([f"{i}. {s['name']}" for i, s in enumerate(stages, 1)][::-1], [s["seconds"] for s in stages][::-1],
            color="#0072B2")
    ax.set_xlabel("seconds")
    ax.set_title("time per stage")
    ax.grid(axis="x", alpha=0.3)
    plots["time_per_stage.png"] = png(fig)
    plt.close(fig)

    if layers:
        fig = layers_figure(layers)
        plots["layers.png"] = png(fig)
        plt.close(fig)
    return plots


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    from compress.rundir import read_report

    path = run_dir / "report.json"
    report = read_report(run_dir)
    if not report.get("stages"):
        raise RunDirError(f"{path}: no finished stage yet")
    return report


def stage_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    stages = report["stages"]
    base = stages[0]
    shown = ("top1", "map50", "map")
    rows = [{"#": i, "stage": s["name"], **{k: v for k, v in s["metrics"].items() if k in shown},
             "params": s["params"], "params_ratio": s["params"] / base["params"],
             "macs_ratio": s["macs"] / max(base["macs"], 1), "size": format_bytes(s["size_bytes"]),
             "compression": base["size_bytes"] / s["size_bytes"], "bits_per_weight": s["bits_per_weight"],
             **({"file_bits_per_param": s["file_bits_per_param"]} if "file_bits_per_param" in s else {}),
             "seconds": s["seconds"]} for i, s in enumerate(stages, 1)]
    return rows, list(dict.fromkeys(k for r in rows for k in r))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}
.side{{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:1.2em}}
@media (max-width:600px){{.side{{grid-template-columns:1fr}}}}</style></head><body>
{body}
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html and the PNGs beside it; returns the HTML path."""
    run_dir = Path(run_dir)
    report = read_run(run_dir)
    stages = report["stages"]
    layers = layer_table(run_dir, stages)
    plots = _plots(report, layers, report["recipe"])
    for name, data in plots.items():
        atomic_write_bytes(run_dir / name, data)
    rows, columns = stage_rows(report)
    alts = {"accuracy_vs_size.png": "accuracy vs size, stages in run order", "time_per_stage.png": "time per stage",
            "layers.png": "layers in model order: kept channels, bits, sensitivity"}
    images = {n: image_tag(n, d, alts.get(n, n)) for n, d in plots.items()}
    body = f"""<h1>{html.escape(report['recipe'])}</h1>
<p class="note">task: {html.escape(report.get('task', ''))}, seed {report.get('seed')}, {len(stages)} stages in run
order; the first stage is the baseline. Size: parameters and buffers as stored in memory (the artifact file adds
its header).</p>
<h2>Stages</h2>{_table(rows, columns)}
<h2>Plots</h2>{images.get('accuracy_vs_size.png', '')}{images.get('time_per_stage.png', '')}
<h2>Layers</h2><p class="note">In model order. kept: output channels after pruning; bits: index bits of the
stored weight (32: kept dense); sensitivity: the output error measured for the layer at those bits when
mixed precision planned them.</p>{images.get('layers.png', '')}
{_table(layers, ["layer", "channels", "kept", "bits", "sensitivity", "weights"])}"""
    out = run_dir / "report.html"
    atomic_write_bytes(out, _page(f"compress report: {report['recipe']}", body).encode())
    return out


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One page with several runs side by side: a summary (last stage of each), their stages on one
    accuracy-vs-size plot, and each run's stage table; returns the HTML path."""
    plt = pyplot()
    dirs = [Path(d) for d in run_dirs]
    reports = [read_run(d) for d in dirs]
    names = [f"{r['recipe']} ({d.name})" if sum(x["recipe"] == r["recipe"] for x in reports) > 1 else r["recipe"]
             for d, r in zip(dirs, reports)]
    fig, _ = accuracy_figure(list(zip(names, reports)))
    plot = png(fig)
    plt.close(fig)
    summary_cols = ["run"] + names
    metric = _metric(reports[0])
    fields = [(metric, lambda r, last: last["metrics"].get(metric)),
              ("baseline " + metric, lambda r, last: r["stages"][0]["metrics"].get(metric)),
              ("size", lambda r, last: format_bytes(last["size_bytes"])),
              ("compression", lambda r, last: r["stages"][0]["size_bytes"] / last["size_bytes"]),
              ("params", lambda r, last: last["params"]), ("MACs", lambda r, last: last["macs"]),
              ("bits_per_weight", lambda r, last: last["bits_per_weight"]),
              ("file_bits_per_param", lambda r, last: last.get("file_bits_per_param")),
              ("stages", lambda r, last: " > ".join(s["name"] for s in r["stages"])),
              ("seconds", lambda r, last: round(sum(s["seconds"] for s in r["stages"]), 1))]
    summary = []
    for label, fn in fields:
        summary.append({"run": label, **{n: fn(r, r["stages"][-1]) for n, r in zip(names, reports)}})
    columns = []
    for name, report in zip(names, reports):
        rows, cols = stage_rows(report)
        columns.append(f"<section><h3>{html.escape(name)}</h3>{_table(rows, cols)}</section>")
    body = f"""<h1>{len(reports)} runs side by side</h1>
<p class="note">{', '.join(html.escape(str(d)) for d in dirs)}; last stage of each run against its first.</p>
<h2>Summary</h2>{_table(summary, summary_cols)}
<h2>Accuracy vs size</h2>{image_tag("accuracy_vs_size.png", plot, "accuracy vs size of every run, stages in run order")}
<h2>Stages</h2><div class="side">{''.join(columns)}</div>"""
    out = Path(out)
    atomic_write_bytes(out, _page("compress report: " + " vs ".join(names), body).encode())
    return out
