"""The sweep report's pieces: Pareto frontier, recommendation, readable size ticks, labels that never overlap."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from compress.evaluate.frontier import (
    frontier_figure,
    pareto,
    recommend,
    write_sweep_report,
    zoom_window,
)
from compress.evaluate.plotting import byte_ticks, format_bytes, label_overlaps, pyplot


def point(i: int, method: str, size: int, metric: float, bits: float = 3, prune: float = 0) -> dict:
    return {"id": f"p{i}", "method": method, "bits": bits, "prune": prune, "status": "done", "file_bytes": size,
            "params": 1000, "bits_per_param": size * 8 / 1000, "metric": metric, "seconds": 1.0, "ratio": 2.0,
            "artifact": f"points/p{i}.safetensors"}


def sweep_of(points: list[dict], ref: float = 0.99) -> dict:
    return {"model": "compress:digits-cnn", "metric": "top1", "data": "digits:val", "task": "classification",
            "tolerance": 1.0, "original": {"metric": ref, "size_bytes": 500_000}, "points": points, "seconds": 9}


def test_pareto_and_recommendation() -> None:
    points = [point(0, "jlcm", 40_000, 0.99), point(1, "rtn", 45_000, 0.98), point(2, "rtn", 30_000, 0.50),
              point(3, "jlcm", 50_000, 0.995), point(4, "kmeans", 40_000, 0.97),
              {"id": "s", "method": "rtn", "bits": 2.5, "prune": 0, "status": "skipped", "reason": "whole bits"}]
    assert [p["id"] for p in pareto(points)] == ["p2", "p0", "p3"]
    assert recommend(points, 0.995, 1.0)["id"] == "p0", "smallest within 1 point"
    assert recommend(points, 0.995, 0.1)["id"] == "p3"
    assert recommend(points, 1.2, 1.0) is None and recommend(points, None, 1.0) is None


@pytest.mark.parametrize("lo, hi", [(34e3, 103e3), (9e3, 800e3), (2e3, 2e8), (40e3, 44e3), (700, 1300), (1e6, 3e9)])
def test_size_ticks_are_few_inside_and_distinct(lo: float, hi: float) -> None:
    ticks = byte_ticks(lo, hi)
    assert 2 <= len(ticks) <= 6
    assert all(lo * 0.95 <= t <= hi * 1.05 for t in ticks)
    labels = [format_bytes(t) for t in ticks]
    assert len(set(labels)) == len(labels), labels


def test_dense_frontier_has_no_overlapping_labels(tmp_path: Path) -> None:
    rng = random.Random(0)
    points = []
    for i in range(36):  # many near-identical points: the case default labels smear
        method = ("jlcm", "rtn", "kmeans", "nf4")[i % 4]
        size = int(30_000 * (1 + i * 0.06) * rng.uniform(0.98, 1.02))
        points.append(point(i, method, size, min(0.995, 0.90 + 0.003 * i + rng.uniform(-0.004, 0.004)),
                            bits=2 + i % 3, prune=0.2 * (i % 2)))
    sweep = sweep_of(points)
    fig, labels = frontier_figure(sweep)
    assert len(labels) == len(pareto(points)) >= 5
    ticks = [t for ax in fig.axes for t in ax.get_xticklabels()]
    assert label_overlaps(fig, labels + ticks) == []
    assert all(t.get_text().endswith("KB") for t in ticks if t.get_text())
    pyplot().close(fig)
    page = write_sweep_report(sweep, tmp_path).read_text()
    assert "Recommended" in page and "<table class=\"sortable\"" in page
    assert (tmp_path / "frontier.png").stat().st_size > 20_000


def test_zoom_panel_only_when_points_spread_far_below_the_original() -> None:
    near = [point(0, "jlcm", 40_000, 0.99), point(1, "rtn", 45_000, 0.985)]
    assert zoom_window(sweep_of(near)) is None
    far = near + [point(2, "rtn", 30_000, 0.2)]
    lo, hi = zoom_window(sweep_of(far))
    assert lo < 0.985 and hi == pytest.approx(0.99)
    fig, _ = frontier_figure(sweep_of(far))
    assert len(fig.axes) == 2
    pyplot().close(fig)
