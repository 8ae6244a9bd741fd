"""tools/fold_table.py: fold means, changes against a baseline and the verdict, from bench_real's JSON lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fold_table  # noqa: E402


def _row(label: str, fold: str, seed: int, conf: float, agr: float, kl: float, bits: float = 4.0) -> dict:
    return {"label": label, "fold": fold, "method": "jlcm", "bits": bits, "seed": seed, "prune": 0.0,
            "confident_agreement": conf, "agreement": agr, "kl": kl}


ROWS = [_row("default", "a", 0, 0.9, 0.80, 0.13), _row("default", "b", 0, 0.9, 0.70, 0.16),
        _row("lever", "a", 0, 0.95, 0.82, 0.11), _row("lever", "a", 1, 0.93, 0.84, 0.09),  # fold a: two seeds
        _row("lever", "b", 0, 0.92, 0.71, 0.15),
        _row("other", "a", 0, 0.95, 0.85, 0.10), _row("other", "b", 0, 0.85, 0.60, 0.20)]


def test_seeds_are_averaged_per_fold_and_verdicts_need_both_folds() -> None:
    means = fold_table.fold_means(ROWS)
    lever = means[("jlcm", 4.0, 0.0, "lever")]
    assert lever["a"]["seeds"] == 2 and abs(lever["a"]["agreement"] - 0.83) < 1e-9 and abs(lever["a"]["kl"] - 0.10) < 1e-9
    lines = fold_table.table(ROWS, "default")
    by_setting = {line.split(" | ")[1]: line for line in lines[2:]}
    assert by_setting["default"].endswith("| baseline |")
    assert by_setting["lever"].endswith("| better |") and "a: +0.030, -0.0300" in by_setting["lever"]
    assert by_setting["other"].endswith("| mixed |")  # up on fold a, down on fold b
    assert fold_table.verdict([(-0.01, 0.02), (-0.03, 0.01)]) == "worse"
    assert fold_table.verdict([]) == "mixed"


def test_cli_reads_files_and_names_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n" + json.dumps({"fold": None, "method": "rtn"}) + "\n")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "fold_table.py"), str(path), "--baseline", "default"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 5 and "| 4 | lever |" in done.stdout  # header, rule, three settings
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "fold_table.py"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"{bad}:1" in done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "fold_table.py"), str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "missing.jsonl" in done.stderr
