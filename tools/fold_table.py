"""The photo-fold table of docs/BENCHMARKS.md from `tools/bench_real.py --fold F --json FILE --label NAME` rows.

    python tools/fold_table.py runs.jsonl [more.jsonl] --baseline default

One line per (method, bits, prune, label): each fold's confident agreement / agreement / KL (the mean over its
seeds when there are several), the mean agreement and KL over the folds and, against the `--baseline` label's
line of the same bits, the change of each fold's agreement and KL and a verdict: "better" when both folds gain
agreement and lose KL, "worse" when both lose agreement and gain KL, else "mixed". A setting is worth measuring
on photos:val only when the verdict is "better"; "mixed" is what one seed per fold usually gives (session 15).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

FIGURES = ("confident_agreement", "agreement", "kl")


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The fold rows (those with a `fold`) of bench_real's JSON-lines files."""
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if row.get("fold"):
                rows.append(row)
    return rows


def fold_means(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(method, bits, prune, label) -> fold -> figure -> mean over that fold's seeds (and "seeds": how many)."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        key = (row["method"], float(row["bits"]), float(row.get("prune", 0.0)), row.get("label", ""))
        groups[key][row["fold"]].append(row)
    out = {}
    for key, folds in groups.items():
        out[key] = {fold: {**{f: sum(r[f] for r in rs) / len(rs) for f in FIGURES}, "seeds": len(rs)}
                    for fold, rs in sorted(folds.items())}
    return out


def verdict(deltas: list[tuple[float, float]]) -> str:
    """"better" / "worse" / "mixed" from each fold's (agreement change, KL change)."""
    if deltas and all(a > 0 and k < 0 for a, k in deltas):
        return "better"
    if deltas and all(a < 0 and k > 0 for a, k in deltas):
        return "worse"
    return "mixed"


def table(rows: list[dict[str, Any]], baseline: str | None) -> list[str]:
    """Markdown lines of the fold table."""
    means = fold_means(rows)
    folds = sorted({fold for by_fold in means.values() for fold in by_fold})
    head = ["bits", "setting", *[f"fold {f}" for f in folds], "mean agreement", "mean KL"]
    if baseline is not None:
        head += ["change (agreement, KL) per fold", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(means, key=lambda k: (k[0], -k[1], k[2], k[3] != baseline, k[3])):
        method, bits, prune, label = key
        by_fold = means[key]
        cells = [" / ".join([f"{by_fold[f]['confident_agreement']:.4f}", f"{by_fold[f]['agreement']:.3f}",
                             f"{by_fold[f]['kl']:.4f}"]) if f in by_fold else "-" for f in folds]
        agreement = sum(v["agreement"] for v in by_fold.values()) / len(by_fold)
        kl = sum(v["kl"] for v in by_fold.values()) / len(by_fold)
        setting = label or "(no label)"
        if method != "jlcm" or prune:
            setting = f"{setting} ({method}{', prune ' + format(prune, 'g') if prune else ''})"
        line = [f"{bits:g}", setting, *cells, f"{agreement:.3f}", f"{kl:.4f}"]
        if baseline is not None:
            base = means.get((method, bits, prune, baseline))
            if base is None or label == baseline:
                line += ["-", "baseline" if label == baseline else "no baseline"]
            else:
                shared = [f for f in folds if f in by_fold and f in base]
                deltas = [(by_fold[f]["agreement"] - base[f]["agreement"], by_fold[f]["kl"] - base[f]["kl"])
                          for f in shared]
                line += ["; ".join(f"{f}: {a:+.3f}, {k:+.4f}" for f, (a, k) in zip(shared, deltas)), verdict(deltas)]
        lines.append("| " + " | ".join(line) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON-lines files written by bench_real.py --json")
    parser.add_argument("--baseline", help="the label the other settings are compared with")
    args = parser.parse_args()
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        raise SystemExit(f"fold_table: no such file: {', '.join(missing)}")
    rows = read_rows(args.files)
    if not rows:
        raise SystemExit("fold_table: no fold rows (bench_real.py --fold F --json FILE) in " +
                         ", ".join(map(str, args.files)))
    print("\n".join(table(rows, args.baseline)))


if __name__ == "__main__":
    main()
