"""The architecture's rules, checked on the source: imports go one way, and loading an artifact is lean."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.compress.fresh_interpreter import HEAVY, OLD_ARTIFACT  # noqa: F401  (HEAVY: test_container uses it)

ROOT = Path(__file__).resolve().parents[2]


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


def test_load_imports_no_training_code_and_reads_an_old_artifact(fresh_interpreter: dict) -> None:
    """In a fresh interpreter, `compress.load` of an artifact written before the read side moved to
    `compress.format` imports none of the training / pruning / plotting stack and gives the outputs it gave then;
    the CLI, the pipeline and the stage registry (what a recipe check or --help needs) import no torch-pruning,
    timm or torchvision (seconds of start-up) until a stage runs. (The interpreter is shared with two other import
    checks: tests/compress/fresh_interpreter.py.)"""
    expected = json.loads((OLD_ARTIFACT.parent / "digits_cls_v1_outputs.json").read_text())
    assert fresh_interpreter["returncode"] == 0, fresh_interpreter["stderr"][-2000:]
    result = fresh_interpreter["result"]
    assert result["heavy"] == [] and result["cli"] == []
    import torch

    assert torch.allclose(torch.tensor(result["logits"]), torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
