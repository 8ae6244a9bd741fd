"""The sweep report: accuracy against file size for every point of a `compress sweep`, the Pareto frontier,
the fp32 original as a reference, a sortable table and the recommended point for a tolerance.

Works on the sweep's JSON alone (`sweep.json`, see compress/sweep), so `compress report SWEEP_DIR` redraws it.
A point is a dict with at least: id, method, bits, prune, status ("done", "skipped", "failed"), and when done
file_bytes, params, metric (the task's primary metric, in [0, 1]) and seconds.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from compress.evaluate.plotting import (
    format_bytes,
    label_overlaps,
    place_labels,
    png,
    pyplot,
    size_axis,
)

METHOD_STYLE = {  # colour-blind safe (Okabe-Ito), one marker per method
    "jlcm": ("#D55E00", "o"), "rtn": ("#0072B2", "s"), "kmeans": ("#009E73", "^"), "nf4": ("#CC79A7", "D"),
}
OTHER_COLOURS = ("#E69F00", "#56B4E9", "#F0E442", "#000000")


def style(method: str, index: int = 0) -> tuple[str, str]:
    return METHOD_STYLE.get(method, (OTHER_COLOURS[index % len(OTHER_COLOURS)], "v"))


def done(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if p.get("status") == "done" and p.get("metric") is not None]


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The done points no other point beats: none is at most as large and at least as good, one strictly.
    Sorted by size."""
    ok = done(points)
    front = [p for p in ok if not any(
        q["file_bytes"] <= p["file_bytes"] and q["metric"] >= p["metric"]
        and (q["file_bytes"] < p["file_bytes"] or q["metric"] > p["metric"]) for q in ok)]
    return sorted(front, key=lambda p: (p["file_bytes"], -p["metric"]))


def recommend(points: list[dict[str, Any]], reference: float | None, tolerance: float) -> dict[str, Any] | None:
    """The smallest done point whose metric is within `tolerance` points (percentage points, 1 = 0.01) of the
    reference (the original's metric); None when none is, or no reference."""
    if reference is None:
        return None
    within = [p for p in done(points) if p["metric"] >= reference - tolerance / 100 - 1e-12]
    return min(within, key=lambda p: (p["file_bytes"], -p["metric"])) if within else None


def settings(point: dict[str, Any]) -> str:
    """`jlcm 2.5b p0.4`: method, bits, share pruned."""
    bits = f"{point['bits']:g}b"
    return f"{point['method']} {bits}" + (f" p{point['prune']:g}" if point.get("prune") else "")


def zoom_window(sweep: dict[str, Any]) -> tuple[float, float] | None:
    """The metric range near the original (down to a few tolerances below it) when the points spread far
    wider, so the points that matter are not squashed against the top; None when one panel shows them well."""
    ok = done(sweep["points"])
    ref = (sweep.get("original") or {}).get("metric")
    if ref is None or not ok:
        return None
    lo_all = min(p["metric"] for p in ok)
    hi = max([p["metric"] for p in ok] + [ref])
    depth = max(4 * sweep.get("tolerance", 1.0), 3.0) / 100
    if ref - lo_all <= 2.5 * depth or not any(p["metric"] >= ref - depth for p in ok):
        return None
    return ref - depth, hi


def _draw(ax: Any, sweep: dict[str, Any]) -> None:
    points = sweep["points"]
    original = sweep.get("original") or {}
    ref = original.get("metric")
    ok = done(points)
    front_ids = {p["id"] for p in pareto(points)}
    best = recommend(points, ref, sweep.get("tolerance", 1.0))
    for i, method in enumerate(dict.fromkeys(p["method"] for p in points)):
        colour, marker = style(method, i)
        mine = sorted((p for p in ok if p["method"] == method), key=lambda p: p["file_bytes"])
        if not mine:
            continue
        ax.scatter([p["file_bytes"] for p in mine], [p["metric"] for p in mine], color=colour, marker=marker,
                   s=36, alpha=0.6, zorder=3, label=f"{method} ({len(mine)} points)")
        own = pareto(mine)  # the method's own frontier: the best it reaches at each size
        ax.step([p["file_bytes"] for p in own], [p["metric"] for p in own], where="post", color=colour, lw=1.5,
                alpha=0.9, zorder=2)
    front = [p for p in ok if p["id"] in front_ids]
    ax.scatter([p["file_bytes"] for p in front], [p["metric"] for p in front], s=120, facecolors="none",
               edgecolors="black", linewidths=1.4, zorder=4, label="Pareto-optimal (all methods)")
    if best is not None:
        ax.scatter([best["file_bytes"]], [best["metric"]], s=280, marker="*", color="gold", edgecolors="black",
                   zorder=5, label=f"recommended (within {sweep.get('tolerance', 1.0):g} point)")
    if ref is not None:
        metric = sweep.get("metric", "metric")
        ax.axhline(ref, color="#444", ls="--", lw=1, zorder=1,
                   label=f"fp32 original: {metric} {ref:.4f}, {format_bytes(original.get('size_bytes', 0))}")
        tol = sweep.get("tolerance", 1.0)
        ax.axhline(ref - tol / 100, color="#999", ls=":", lw=1, zorder=1, label=f"original - {tol:g} point")
    ax.grid(alpha=0.3, which="major")


def frontier_figure(sweep: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The frontier plot and its point labels (for overlap checks). x: the artifact's bytes on a log axis;
    y: the metric; one series per method with its own frontier as a step line; the Pareto-optimal points of
    all methods circled and labelled; the original as a dashed line. When the points spread far below the
    original, a second panel zooms on the band near it."""
    plt = pyplot()
    points, metric = sweep["points"], sweep.get("metric", "metric")
    ok = done(points)
    front = pareto(points)
    zoom = zoom_window(sweep)
    if zoom is None:
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        axes = [ax]
    else:
        fig, axes = plt.subplots(2, 1, figsize=(8.5, 8.4), sharex=True, height_ratios=(1, 1.25))
    size_axis(axes[0], [p["file_bytes"] for p in ok])
    ys = [p["metric"] for p in ok] + ([sweep["original"]["metric"]] if (sweep.get("original") or {}).get("metric")
                                       is not None else [])
    for i, ax in enumerate(axes):
        _draw(ax, sweep)
        ax.set_ylabel(f"{metric} on {sweep.get('data', 'the evaluation split')}")
    if ys:
        lo, hi = min(ys), max(ys)
        span = max(hi - lo, 0.02)
        axes[0].set_ylim(lo - 0.08 * span, hi + 0.18 * span)
    axes[0].set_title(f"{metric} vs file size: {sweep.get('model', '')}" + (" (all points)" if zoom else ""))
    if zoom is not None:
        lo, hi = zoom
        axes[1].set_ylim(lo, hi + 0.25 * (hi - lo))
        axes[1].set_title(f"near the original: {metric} from {lo:.3f}", fontsize=10)
    axes[-1].set_xlabel("file size (artifact bytes, log scale)")
    handles, names = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                    frameon=False)
    axes[-1].tick_params(axis="x", labelbottom=True)
    labels = []
    for i, ax in enumerate(axes):
        # with a zoom panel (the last one), a Pareto point is labelled in the zoom when it lies in its band,
        # else in the panel of all points; without one, in the only panel
        if zoom is not None and i == 0:
            mine = [p for p in front if p["metric"] < zoom[0]]
        else:
            y0, y1 = ax.get_ylim()
            mine = [p for p in front if y0 <= p["metric"] <= y1]
        ids = {p["id"] for p in mine}
        others = [(p["file_bytes"], p["metric"]) for p in ok if p["id"] not in ids]
        labels += place_labels(ax, [(p["file_bytes"], p["metric"]) for p in mine], [settings(p) for p in mine],
                               fontsize=7.5, avoid=others)
    return fig, labels


def frontier_png(sweep: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig, labels = frontier_figure(sweep)
    overlaps = label_overlaps(fig, labels + [t for ax in fig.axes for t in ax.get_xticklabels()])
    data = png(fig)
    plt.close(fig)
    if overlaps:  # never expected: place_labels looks for a free spot; say so rather than draw a smear silently
        import warnings

        warnings.warn(f"frontier plot: labels overlap: {overlaps[:3]}", stacklevel=2)
    return data


def _cell(value: Any, sort: Any = None) -> str:
    key = "" if sort is None else f' data-sort="{html.escape(str(sort))}"'
    return f"<td{key}>{html.escape(str(value))}</td>"


def points_table(sweep: dict[str, Any]) -> str:
    """Every point, done or not: sortable by clicking a column head (numbers sort as numbers)."""
    ref = (sweep.get("original") or {}).get("metric")
    front_ids = {p["id"] for p in pareto(sweep["points"])}
    best = recommend(sweep["points"], ref, sweep.get("tolerance", 1.0))
    metric = sweep.get("metric", "metric")
    head = ["method", "bits", "prune", metric, "vs original", "file bytes", "file bits/param", "x smaller", "params",
            "seconds", "Pareto", "status"]
    rows = []
    for p in sweep["points"]:
        if p.get("status") == "done":
            delta = None if ref is None else (p["metric"] - ref) * 100
            cells = [_cell(p["method"]), _cell(f"{p['bits']:g}", p["bits"]), _cell(f"{p['prune']:g}", p["prune"]),
                     _cell(f"{p['metric']:.4f}", p["metric"]),
                     _cell("" if delta is None else f"{delta:+.2f} pt", "" if delta is None else delta),
                     _cell(f"{p['file_bytes']:,}", p["file_bytes"]),
                     _cell(f"{p['bits_per_param']:.2f}", p["bits_per_param"]),
                     _cell(f"{p.get('ratio', 0):.1f}x", p.get("ratio", 0)), _cell(f"{p['params']:,}", p["params"]),
                     _cell(f"{p['seconds']:.1f}", p["seconds"]), _cell("yes" if p["id"] in front_ids else ""),
                     _cell("recommended" if best is not None and p["id"] == best["id"] else "done")]
        else:
            cells = [_cell(p["method"]), _cell(f"{p['bits']:g}", p["bits"]), _cell(f"{p['prune']:g}", p["prune"])]
            cells += [_cell("", "")] * 8 + [f'<td title="{html.escape(p.get("reason", ""))}">'
                                          f'{html.escape(p.get("status", ""))}</td>']
        cls = ' class="best"' if best is not None and p["id"] == best["id"] else (
            ' class="front"' if p["id"] in front_ids else (' class="off"' if p.get("status") != "done" else ""))
        rows.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    heads = "".join(f'<th scope="col" tabindex="0">{html.escape(h)}</th>' for h in head)
    reasons: dict[str, list[str]] = {}
    for p in sweep["points"]:
        if p.get("status") in ("skipped", "failed"):
            reasons.setdefault(f"{p['status']}: {p.get('reason', '')}", []).append(
                f"{p['method']} {p['bits']:g}b" + (f" p{p['prune']:g}" if p.get("prune") else ""))
    notes = "".join(f"<li><b>{html.escape(', '.join(dict.fromkeys(who)))}</b>: {html.escape(why)}</li>"
                    for why, who in reasons.items())
    return (f'<div class="scroll"><table class="sortable" id="points"><thead><tr>{heads}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>' + (f'<ul class="note">{notes}</ul>' if notes else ""))


SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    function sort() {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
      function key(row) {
        var cell = row.cells[col], raw = cell.hasAttribute('data-sort') ? cell.getAttribute('data-sort') : cell.textContent;
        var num = parseFloat(raw);
        return raw === '' ? null : (isNaN(num) ? raw : num);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null) return 1; if (y === null) return -1;
        var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener('click', sort);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sort(); });
    th.sortBy = sort;
  });
  // a link may ask for a sorted view: report.html#sort=file%20bytes (ascending) or #sort=-top1 (descending)
  var asked = decodeURIComponent(location.hash).match(/^#sort=(-?)(.+)$/);
  if (asked) {
    table.querySelectorAll('th').forEach(function (th) {
      if (th.textContent.trim() === asked[2]) { th.sortBy(); if (asked[1]) th.sortBy(); }
    });
  }
});
"""

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1150px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;white-space:nowrap}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}td:first-child,th:first-child{text-align:left}
tr.best td{background:#fff5c2;font-weight:600}tr.front td{background:#f1f7ff}tr.off td{color:#888}
td.reason{text-align:left;white-space:normal;min-width:18em}.scroll{overflow-x:auto}
img{max-width:100%;height:auto}figure{margin:1em 0}.note{color:#555;font-size:14px}
.callout{border-left:4px solid #e6b800;background:#fffbe6;padding:.6em 1em;margin:1em 0}
.missing{border:2px dashed #c00;color:#c00;padding:1em}"""

IMG_CHECK = "this.outerHTML='<p class=missing>plot missing: '+this.alt+'</p>';console.error('plot missing: '+this.alt)"


def image_tag(name: str, data: bytes, alt: str) -> str:
    """An embedded PNG that, if it cannot be decoded, shows a visible note and logs a console error."""
    return (f'<figure><img alt="{html.escape(alt)}" data-plot="{html.escape(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}" onerror="{IMG_CHECK}"></figure>')


def sweep_page(sweep: dict[str, Any], plot: bytes) -> str:
    original = sweep.get("original") or {}
    metric = sweep.get("metric", "metric")
    ref = original.get("metric")
    tol = sweep.get("tolerance", 1.0)
    best = recommend(sweep["points"], ref, tol)
    counts = {s: sum(p.get("status") == s for p in sweep["points"]) for s in ("done", "skipped", "failed")}
    if best is not None:
        callout = (f"<b>Recommended</b> (smallest within {tol:g} point of the original's {metric} {ref:.4f}): "
                   f"<b>{html.escape(settings(best))}</b>, {best['file_bytes']:,} bytes "
                   f"({best['bits_per_param']:.2f} bits/param, {best.get('ratio', 0):.1f}x smaller than fp32), "
                   f"{metric} {best['metric']:.4f} ({(best['metric'] - ref) * 100:+.2f} pt). "
                   f"File: <code>{html.escape(str(best.get('artifact', '')))}</code>")
    elif ref is not None:
        callout = f"No point is within {tol:g} point of the original's {metric} {ref:.4f}."
    else:
        callout = "The original was not evaluated: no recommendation."
    front = pareto(sweep["points"])
    front_text = ", ".join(f"{html.escape(settings(p))} ({format_bytes(p['file_bytes'])}, {p['metric']:.4f})"
                           for p in front)
    title = f"compress sweep: {sweep.get('model', '')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">checkpoint <code>{html.escape(str(sweep.get('checkpoint')))}</code>, {html.escape(sweep.get('task', ''))};
calibration {html.escape(str(sweep.get('calib', '')))}, evaluated on {html.escape(str(sweep.get('data', '')))};
{counts['done']} points done, {counts['skipped']} skipped, {counts['failed']} failed;
{sweep.get('seconds', 0):.0f} s of work.</p>
<div class="callout">{callout}</div>
<h2>{html.escape(metric)} vs file size</h2>
{image_tag("frontier.png", plot, f"{metric} vs file size, one series per method, Pareto frontier marked")}
<p class="note">Each method's line joins its own Pareto-optimal points; circled points are Pareto-optimal over all
methods (no other point is both smaller and better), labelled method, bits (jlcm: average bits per weight of the
whole model; rtn/kmeans/nf4: index bits of every layer) and share of parameters pruned. File size is the
artifact's bytes on disk (header included). Pareto frontier: {front_text or 'none'}.</p>
<h2>Every point</h2><p class="note">Click a column to sort (or link to <code>report.html#sort=file bytes</code>,
<code>#sort=-{html.escape(metric)}</code> for descending). file bits/param = file bytes x 8 / parameters
of the stored model.</p>
{points_table(sweep)}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def write_sweep_report(sweep: dict[str, Any] | str | Path, out_dir: str | Path | None = None) -> Path:
    """Write OUT_DIR/report.html and OUT_DIR/frontier.png for a sweep (its dict, or its sweep.json path or
    folder); returns the HTML path."""
    if not isinstance(sweep, dict):
        path = Path(sweep)
        path = path / "sweep.json" if path.is_dir() else path
        out_dir = out_dir or path.parent
        sweep = json.loads(path.read_text())
    if out_dir is None:
        raise ValueError("write_sweep_report: give out_dir with a sweep dict")
    out_dir = Path(out_dir)
    plot = frontier_png(sweep)
    (out_dir / "frontier.png").write_bytes(plot)
    out = out_dir / "report.html"
    out.write_text(sweep_page(sweep, plot))
    return out
