"""storage/ is the lowest layer: its modules import each other without a cycle, never import the node
(``dicom_node``), and none is named like a standard-library module (a reader, or a tool that resolves names
by file, would take it for the standard library's)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "storage"


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in ROOT.glob("*.py") if p.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "storage" if node.level == 1 else ""
            name = ".".join(x for x in (base, node.module or "") if x)
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _storage_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            if parts[0] == "storage" and len(parts) > 1 and parts[1] in mods and parts[1] != name:
                targets.add(parts[1])
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_storage_modules():
    graph = _storage_graph()
    assert {"timeline", "jobs", "deliveries"} <= set(graph)  # the walk sees the modules it is about
    assert "timeline" in graph["deliveries"]
    cycle = _cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_storage_never_imports_the_node():
    problems = [f"storage/{p.name} imports {n}" for p in ROOT.glob("*.py") for n in _imports(p)
                if n.split(".")[0] == "dicom_node"]
    assert not problems, "\n".join(problems)


def test_no_storage_module_shadows_the_standard_library():
    shadowing = sorted(set(_modules()) & set(sys.stdlib_module_names))
    assert not shadowing, f"storage modules named like standard-library modules: {shadowing}"
