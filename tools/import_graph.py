"""The import graph of `compress` and `calib`, read from the source (every import, lazy ones included; imports
under `if TYPE_CHECKING:` left out), and the two rules the architecture keeps (docs/ARCHITECTURE.md):

1. no cycle: no module reaches itself through imports;
2. one way: nothing below the stages (libraries, the read side, models, data) imports a stage, the runner, the
   recipe, shrink, sweep or the CLI.

    python tools/import_graph.py          # prints every cycle and rule break; exit 1 when there is one
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "calib")
# the top of the house: what drives runs; everything else is below and must not import it
UPPER = ("compress.stages", "compress.pipeline", "compress.recipe", "compress.shrink", "compress.sweep", "compress.cli",
         "compress.__main__")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` counts as pkg.name when that is a
    module, else as pkg)."""
    mods = module_files(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] not in PACKAGES:
                    continue
                targets = [resolve(f"{module}.{alias.name}") for alias in node.names]
            graph[name].update(t for t in targets if t and t != name)
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_upper(module: str) -> bool:
    return any(module == u or module.startswith(u + ".") for u in UPPER)


def layer_breaks(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported) pairs where a module below the stages imports the stages, runner, recipe, shrink or
    CLI. The package root `compress` is lazy and counts as neither."""
    return sorted((m, t) for m, targets in graph.items() if m != "compress" and not is_upper(m)
                  for t in targets if is_upper(t))


def main() -> int:
    graph = import_graph()
    found = cycles(graph)
    breaks = layer_breaks(graph)
    edges = sum(len(t) for t in graph.values())
    print(f"{len(module_files())} modules, {edges} imports between them")
    for component in found:
        print(f"cycle of {len(component)}: {', '.join(component)}")
    for module, target in breaks:
        print(f"one-way rule broken: {module} imports {target}")
    if not found and not breaks:
        print("no cycle; nothing below the stages imports a stage, the runner, the recipe, shrink, sweep or the CLI")
    return 1 if found or breaks else 0


if __name__ == "__main__":
    raise SystemExit(main())
