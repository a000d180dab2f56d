"""The layering ARCHITECTURE.md describes, checked on the source: who may import whom, and no
import cycles (function-local imports included: they may not hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "chat", "cluster", "engine", "faq", "tools", "migrations")
# What each package may import from the project (itself always).
ALLOWED = {
    "engine": set(),
    "faq": set(),
    "migrations": set(),
    "chat": {"engine", "migrations"},
    "cluster": {"chat", "engine", "faq"},
    "bot": {"chat", "cluster", "engine", "faq", "tools"},  # the command line dispatches to the tools
    "tools": {"chat", "engine"},
}


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, imported only for type checking) of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, id(node) in typing_only))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_run_downward_only(module: str) -> None:
    """front end -> chat -> engine; faq on its own; tools over chat and engine, never the bot."""
    package = module.split(".", maxsplit=1)[0]
    for name, _ in project_imports(SOURCES[module]):
        target = name.split(".")[0]
        assert target == package or target in ALLOWED[package], f"{module} imports {name}"


def test_storage_internals_stay_inside_storage() -> None:
    """Only chat.storage uses its private SQLite modules; a new backend is a module beside them."""
    for module, path in SOURCES.items():
        for name, _ in project_imports(path):
            if name.startswith("chat.storage._"):
                assert module.startswith("chat.storage"), f"{module} imports {name}"


def test_no_import_cycles() -> None:
    """No cycle between modules, counting every import that runs (not those for type checks)."""
    graph: dict[str, set[str]] = {}
    for module, path in SOURCES.items():
        edges = set()
        for imported, typing_only in project_imports(path):
            if typing_only:
                continue
            name = imported
            while name and name not in SOURCES:  # "from chat.storage import x" -> chat.storage
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
