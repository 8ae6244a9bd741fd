"""The architecture's rules, checked on the source: imports go one way, and loading an artifact is lean."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD_ARTIFACT = ROOT / "tests" / "compress" / "format" / "data" / "digits_cls_v1.safetensors"
HEAVY = ("torch_pruning", "timm", "torchmetrics", "matplotlib", "onnx", "accelerate", "triton", "torchvision",
         "compress.stages", "compress.pipeline", "compress.recipe", "compress.train", "compress.prune",
         "compress.sparse", "compress.distill", "compress.quant", "compress.shrink")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph(tool) -> dict[str, set[str]]:
    """The import graph read from the source once for this file (the source does not change during a run)."""
    return tool.import_graph()


@pytest.fixture(autouse=True)
def _keep_recursion_limit():
    """`cycles` raises the interpreter's recursion limit for its depth-first walk; put it back, so the rest of the
    session (e.g. the deeply nested YAML test, whose parser gets 10x slower with a higher limit) runs as usual."""
    limit = sys.getrecursionlimit()
    yield
    sys.setrecursionlimit(limit)


def test_import_graph_has_no_cycle(tool, graph) -> None:
    assert len(graph) > 50  # the walk found the packages
    assert tool.cycles(graph) == []


def test_cycle_finder_finds_a_cycle(tool) -> None:
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_stages_imports_stages_runner_or_recipe(tool, graph) -> None:
    assert tool.layer_breaks(graph) == []
    assert tool.layer_breaks({"compress.quant.api": {"compress.recipe"}}) == [("compress.quant.api", "compress.recipe")]


def test_load_imports_no_training_code_and_reads_an_old_artifact() -> None:
    """In a fresh interpreter, `compress.load` of an artifact written before the read side moved to
    `compress.format` imports none of the training / pruning / plotting stack and gives the outputs it gave then;
    the CLI, the pipeline and the stage registry (what a recipe check or --help needs) import no torch-pruning,
    timm or torchvision (seconds of start-up) until a stage runs."""
    expected = json.loads((OLD_ARTIFACT.parent / "digits_cls_v1_outputs.json").read_text())
    code = (
        "import json, sys, torch, compress\n"
        f"model = compress.load({str(OLD_ARTIFACT)!r})\n"
        "torch.manual_seed(0)\n"
        "with torch.no_grad():\n"
        "    y = model(torch.rand(2, 3, 32, 32))\n"
        f"heavy = [n for n in {HEAVY!r} if n in sys.modules]\n"
        "import compress.cli, compress.pipeline, compress.stages, compress.prune\n"
        "cli = [n for n in ('torch_pruning', 'timm', 'torchvision') if n in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'cli': cli, 'logits': y.tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["cli"] == []
    import torch

    assert torch.allclose(torch.tensor(result["logits"]), torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
