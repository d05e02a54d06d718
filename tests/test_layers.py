"""The package's layers (docs/layout.md), read from the source with `ast`: every import of an
mmca module, at the top of a module or inside a function, goes to the same layer or a lower
one, and no module reaches itself through its imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module's layer is that of its top-level name under mmca (mmca.engine.scoring:
# "engine"); "mmca" is the package's own __init__, the public facade over everything.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config", "metrics", "runtime", "hardware", "atomic", "dist", "folders", "extras", "version", "loss"),
    ("data",),
    ("features",),
    ("model",),
    ("engine",),
    ("train", "evaluate", "checkpoint", "export"),
    ("api", "search", "bench"),
    ("cli", "__main__"),
    ("mmca",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> set[str]:
    """The mmca modules one import statement names (`from a import b` names a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    named = {f"{base}.{a.name}" for a in node.names} & modules
    return named or ({base} & modules)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the mmca modules it imports anywhere in its source."""
    files = {module_name(p, src): p for p in (src / "mmca").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set().union(*(imported(n, package, set(files)) for n in ast.walk(tree)
                                    if isinstance(n, (ast.Import, ast.ImportFrom)))) - {name}
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def against_the_rule(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph.items() for b in deps
                  if RANK[layer(b)] > RANK[layer(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a path."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(group, graph) for group in groups]


def _path_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    path, seen = [start], {start}
    while True:
        nxt = min(w for w in graph[path[-1]] if w in group)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_every_module_has_a_layer():
    assert sorted({layer(m) for m in import_graph()} - set(RANK)) == []


def test_imports_follow_the_layers():
    assert against_the_rule(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import_inside_a_function(tmp_path):
    """The checks themselves, on a copy of a tiny package: an import placed inside a function counts."""
    pkg = tmp_path / "mmca"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("from mmca.engine import b\n")
    (pkg / "engine" / "b.py").write_text("def f():\n    from mmca.engine.a import x\n    from mmca import errors\n")
    (pkg / "metrics.py").write_text("def f():\n    from .engine import a\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["mmca.engine.a", "mmca.engine.b", "mmca.engine.a"]]
    assert against_the_rule(graph) == ["mmca.metrics (metrics) imports mmca.engine.a (engine)"]


@pytest.mark.parametrize("module", ["mmca.engine.scoring", "mmca.cli.bench"])
def test_the_graph_holds_known_edges(module):
    """A parser that finds nothing would pass the two checks above; these edges exist."""
    assert import_graph()[module]
