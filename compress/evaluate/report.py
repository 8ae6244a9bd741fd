"""`compress report RUN_DIR`: a self-contained HTML page (plots as data URIs) and PNGs beside it.

Reads only what a run leaves on disk: report.json, and the stage checkpoints' headers (tensor shapes and
JSON metadata), so it works on a finished or a killed run and never loads a model.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from compress.errors import RunDirError


def _read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Tensor shapes and model_meta of a stage checkpoint, from its header only."""
    from safetensors import safe_open

    from compress.format.validate import read_stage_checkpoint

    _, _, meta = read_stage_checkpoint(path, allow_build="*")  # every check of a load, nothing built
    with safe_open(str(path), framework="pt") as handle:
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return shapes, meta


def layer_table(run_dir: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer: output channels in the baseline and at the end, and the bits its weight is stored with."""
    from compress.rundir import inside

    base_shapes, _ = _read_header(inside(run_dir, stages[0]["checkpoint"], "report.json stages.0.checkpoint"))
    last_shapes, last_meta = _read_header(inside(run_dir, stages[-1]["checkpoint"], "report.json checkpoint"))
    plan_layers = (last_meta.get("quantization") or {}).get("layers") or []
    quant = {entry["name"]: {**entry.get("layout", {}), "bits": entry.get("bits")} for entry in plan_layers
             if entry.get("attr", "weight") == "weight"}
    rows = []
    for name, shape in base_shapes.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        layer = name[: -len(".weight")]
        layout = quant.get(layer) if isinstance(quant, dict) else None
        final = last_shapes.get(name) or (layout or {}).get("shape")
        if final is None and f"{layer}.weight_packed" in last_shapes:
            final = [last_shapes[f"{layer}.weight_packed"][0]]
        bits = (layout or {}).get("bits", 32 if name in last_shapes else None)
        rows.append({"layer": layer, "channels": shape[0], "kept": final[0] if final else None,
                     "bits": bits, "weights": int(__import__("math").prod(shape))})
    return rows


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _plots(report: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    metric = "map50" if report.get("task") == "detection" else "top1"
    plots: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [s["size_bytes"] / 1e6 for s in stages]
    values = [s["metrics"].get(metric, float("nan")) for s in stages]
    ax.plot(sizes, values, "o-")
    for s, x, y in zip(stages, sizes, values):
        ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel(metric)
    ax.set_title("accuracy vs size per stage")
    ax.grid(alpha=0.3)
    plots["accuracy_vs_size.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([s["name"] for s in stages][::-1], [s["seconds"] for s in stages][::-1])
    ax.set_xlabel("seconds")
    ax.set_title("time per stage")
    plots["time_per_stage.png"] = _png(fig)
    plt.close(fig)

    if layers:
        fig, ax1 = plt.subplots(figsize=(max(6, len(layers) * 0.18), 4))
        xs = range(len(layers))
        ax1.bar(xs, [l["channels"] for l in layers], color="#ccc", label="baseline channels")
        ax1.bar(xs, [l["kept"] or 0 for l in layers], color="#1f77b4", label="kept channels")
        ax1.set_ylabel("output channels")
        ax1.set_xticks([])
        ax1.set_xlabel("layers in order")
        ax2 = ax1.twinx()
        ax2.plot(xs, [l["bits"] if l["bits"] is not None else float("nan") for l in layers], "r.", label="bits")
        ax2.set_ylabel("bits per weight index")
        ax1.legend(loc="upper left", fontsize=8)
        ax1.set_title("per-layer kept channels and bits")
        plots["layers.png"] = _png(fig)
        plt.close(fig)
    return plots


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html and the PNGs beside it; returns the HTML path."""
    run_dir = Path(run_dir)
    from compress.format.checkpoint import atomic_write_bytes
    from compress.rundir import read_report

    path = run_dir / "report.json"
    report = read_report(run_dir)
    stages = report.get("stages", [])
    if not stages:
        raise RunDirError(f"{path}: no finished stage yet")
    layers = layer_table(run_dir, stages)
    plots = _plots(report, layers)
    for name, data in plots.items():
        atomic_write_bytes(run_dir / name, data)
    base = stages[0]
    shown = ("top1", "map50", "map")
    rows = [{"stage": s["name"], **{k: v for k, v in s["metrics"].items() if k in shown},
             "params": s["params"], "params_ratio": s["params"] / base["params"], "macs_ratio": s["macs"] / max(base["macs"], 1),
             "size_MB": s["size_bytes"] / 1e6, "compression": base["size_bytes"] / s["size_bytes"],
             "bits_per_weight": s["bits_per_weight"], "seconds": s["seconds"]} for s in stages]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    images = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></figure>'
                     for n, d in plots.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compress report: {html.escape(report['recipe'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f3f3f3}}img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(report['recipe'])}</h1>
<p>task: {html.escape(report.get('task', ''))}, seed {report.get('seed')}, {len(stages)} stages; first stage is the baseline.</p>
<h2>Stages</h2>{_table(rows, columns)}
<h2>Plots</h2>{images}
<h2>Layers</h2>{_table(layers, ["layer", "channels", "kept", "bits", "weights"])}
</body></html>
"""
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode())
    return out
