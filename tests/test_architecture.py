"""The import graph of `spo` and `preference_model`, built from the source: no cycles (imports
inside functions count), `preference_model` stands alone, and commands sit on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("spo", "preference_model")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (functions included).
    `from X import name` points at `X.name` when that is a module, else at `X`."""
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 30  # the walk found the modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_preference_model_imports_nothing_from_spo():
    graph = import_graph(ROOT)
    offending = {
        (m, t)
        for m, targets in graph.items()
        if m.startswith("preference_model")
        for t in targets
        if t.split(".")[0] == "spo"
    }
    assert not offending


def test_only_the_cli_and_commands_depend_on_commands():
    graph = import_graph(ROOT)
    for module, targets in graph.items():
        if module in ("spo.cli", "spo.__main__"):  # the entry points
            continue
        assert "spo.cli" not in targets, module
        if not module.startswith("spo.commands"):
            assert not any(t.startswith("spo.commands") for t in targets), module


@pytest.mark.parametrize("where", ["top", "function"])
def test_a_cycle_is_found_wherever_the_import_stands(tmp_path, where):
    """The checker itself: a cycle through an import inside a function is still a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    inner = "def g():\n    from pkg import a\n" if where == "function" else "import pkg.a\n"
    (pkg / "b.py").write_text(inner + "def f():\n    pass\n")
    (pkg / "c.py").write_text("from pkg import a, b\n")  # no cycle through c
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.c"] == {"pkg.a", "pkg.b"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
