"""The product's import graph has no cycle, not even through imports under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "worker", "supervisor")


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module in PACKAGES:  # from worker import xtnd
                        deps.update(f"{node.module}.{a.name}" for a in node.names)
                    else:
                        deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
            graph[f"{package}.{path.stem}"] = deps
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def test_no_import_cycle_in_the_product():
    """Every import (TYPE_CHECKING and function-level ones included) points one way only."""
    graph, done, cycles = _graph(), set(), []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles
