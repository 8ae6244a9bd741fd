"""Plot helpers shared by the run report and the sweep report: a file-size log axis with readable ticks, and
labels placed so that they never overlap each other, the points or the axes' frame."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

NICE = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)


def format_bytes(n: float) -> str:
    """35 KB, 1.2 MB, 820 B: short and readable (decimal units, as file sizes are shown)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def byte_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Tick values for a log axis of sizes from `lo` to `hi`: the densest of the 1-2-5 style series that gives
    at most `max_ticks` ticks inside (at least two)."""
    lo, hi = max(min(lo, hi), 1.0), max(lo, hi, 1.0)
    series = ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
              (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0), (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))
    best: list[float] = []
    for subs in series:
        ticks = sorted({round(m * 10.0 ** e, 6) for e in range(math.floor(math.log10(lo)) - 1,
                                                                 math.ceil(math.log10(hi)) + 1)
                        for m in subs if lo <= m * 10.0 ** e <= hi})
        if len(ticks) > max_ticks:
            break
        best = ticks
    if len(best) < 2:  # a very narrow range: the ends themselves, rounded to 2 significant digits
        best = sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})
    return best


def size_axis(ax: Any, values: Sequence[float], pad: float = 1.25) -> None:
    """Log x axis of file sizes in bytes: range padded by `pad` each side, ticks from `byte_ticks`, labelled
    `35 KB`; no minor tick labels (they are what overlaps on a default log axis)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    finite = [v for v in values if v and v > 0 and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (1e3, 1e6)
    lo, hi = lo / pad, hi * pad
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(byte_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _overlap(a: Any, b: Any, pad: float = 2.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def _offsets() -> list[tuple[float, float]]:
    """Candidate label offsets (points from the anchor), nearest first, then rings further out."""
    near = [(8, 7), (8, -9), (-8, 7), (-8, -9), (0, 12), (0, -14), (12, 0), (-12, 0)]
    rings = []
    for radius in range(20, 161, 14):
        for k in range(16):
            angle = 2 * math.pi * k / 16 + (math.pi / 16 if radius % 28 else 0)
            rings.append((radius * math.cos(angle), radius * 0.8 * math.sin(angle)))
    return near + rings


class _Box:
    def __init__(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1, y1


def place_labels(ax: Any, anchors: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 8,
                 avoid: Sequence[tuple[float, float]] = (), **text_kw: Any) -> list[Any]:
    """Annotate each anchor (data coordinates) with its text at the first candidate offset where the label
    overlaps no label placed before, no anchor or `avoid` point, stays inside the axes and is nearer its own
    point than any other; a far label gets a thin leader line. Returns the annotations, in order."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    dots = [tuple(to_px(p)) for p in list(anchors) + list(avoid)]
    scale = fig.dpi / 72
    marker = 5.5 * scale  # about half a large marker, in pixels
    boxes: list[Any] = []
    placed: list[Any] = []

    def distance(box: Any, px: float, py: float) -> float:
        return math.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))

    for index, ((x, y), text) in enumerate(zip(anchors, texts)):
        probe = ax.text(0, 0, text, fontsize=fontsize, **text_kw)
        size = probe.get_window_extent(renderer)
        probe.remove()
        w, h = size.width, size.height
        ax_px, ay_px = dots[index]
        best, best_score = None, None
        for dx, dy in _offsets():
            ox, oy = dx * scale, dy * scale
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            x0 = ax_px + ox if ha == "left" else ax_px + ox - w if ha == "right" else ax_px + ox - w / 2
            y0 = ay_px + oy if dy >= 0 else ay_px + oy - h
            box = _Box(x0, y0, x0 + w, y0 + h)
            score = sum(_overlap(box, b) for b in boxes) * 10
            score += sum(box.x0 - marker < px < box.x1 + marker and box.y0 - marker < py < box.y1 + marker
                         for px, py in dots) * 5
            score += (box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1) * 1
            own = distance(box, ax_px, ay_px)
            # a label nearer another point than its own reads as that point's label
            score += any(distance(box, *d) < own for i, d in enumerate(dots) if i != index) * 3
            if best_score is None or score < best_score:
                best, best_score = (dx, dy, ha, box), score
            if score == 0:
                break
        dx, dy, ha, box = best
        far = math.hypot(dx, dy) > 16
        note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha,
                           va="bottom" if dy >= 0 else "top",
                           arrowprops=dict(arrowstyle="-", lw=0.5, color="#888", shrinkA=0, shrinkB=4) if far else None,
                           **text_kw)
        placed.append(note)
        boxes.append(box)
    return placed


def label_overlaps(fig: Any, labels: Sequence[Any]) -> list[tuple[str, str]]:
    """Pairs of labels (texts or tick labels) whose drawn boxes overlap: what a reader would see as a smear."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    shown = [t for t in labels if t.get_visible() and t.get_text()]
    boxes = [Text.get_window_extent(t, renderer) for t in shown]  # the text itself, not an annotation's leader
    return [(shown[i].get_text(), shown[j].get_text()) for i in range(len(shown)) for j in range(i + 1, len(shown))
            if _overlap(boxes[i], boxes[j], pad=0.0)]


def png(fig: Any, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
