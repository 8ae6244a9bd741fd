import json
import sys
from pathlib import Path

import pytest
import yaml

from compress.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.integration
@pytest.mark.slow
def test_bench_quant_benchmarks_a_stage_of_a_run_dir(tiny_recipe_path: Path, tmp_path: Path) -> None:
    from compress.pipeline import run

    data = yaml.safe_load(tiny_recipe_path.read_text())
    data["stages"] = [{"finetune": {"epochs": 1, "lr": 3.0e-3, "warmup_epochs": 0}}]
    report = run(parse_recipe(data), tmp_path / "run")
    out = tmp_path / "rows.json"
    # the tool's main() in this process (its start-up, torch and the quantization stack, is not what is tested)
    _bench_quant_main(["--run-dir", str(tmp_path / "run"), "--stage", "finetune", "--methods", "rtn", "--bits", "4",
                       "--mixed", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rows["metric"] == "top1" and rows["stage"] == "finetune"
    assert [r["method"] for r in rows["rows"]] == ["float", "rtn"]
    # the float row is the stage's own evaluation: the pipeline's task and val split
    assert rows["rows"][0]["top1"] == pytest.approx(report["stages"][0]["metrics"]["top1"])
    assert 4 < rows["rows"][1]["bpw"] < 5
    # the refusal of a stage the run lacks: main() exits with the message, which a process prints on stderr with
    # exit status 1
    with pytest.raises(SystemExit) as missing:
        _bench_quant_main(["--run-dir", str(tmp_path / "run"), "--stage", "distill"])
    assert isinstance(missing.value.code, str) and "no checkpoint of stage 'distill'" in missing.value.code


def _bench_quant_main(argv: list[str]) -> None:
    """tools/bench_quant.py's main() on `argv`, with the thread count and seeds it sets put back afterwards."""
    import importlib.util
    import random

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "tools" / "bench_quant.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    threads, states = torch.get_num_threads(), (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["bench_quant.py", *argv])
            tool.main()
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
