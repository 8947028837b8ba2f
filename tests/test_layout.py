"""The package's import layout: every module imports, no import circles, arrows only the allowed way.

The import graph is read from the sources with ``ast``: every ``import`` statement counts (top level,
inside functions, under ``if TYPE_CHECKING``); ``from pkg import name`` is an arrow to ``pkg.name`` when
that is a module, else to ``pkg``. The parent packages a dotted import runs are not arrows: they are the
folders, not the choice of the importer. Run alone: ``python -m pytest -q tests/test_layout.py``.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "sglang_shplb"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: part -> the parts (besides itself) it may import; a part not listed here may import any part
ALLOWED = {"core": set(), "kernels": {"core"}, "scheduler": {"core", "kernels"}}
#: part -> the parts it never imports
FORBIDDEN = {"serving": {"planning"}, "planning": {"serving", "scheduler"},
             "evaluation": {"serving", "scheduler", "kernels"}}  # the eval drives servers as subprocesses


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    """``core``, ``planning``, ``kernels``, ``scheduler``, ``serving``, or the module itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else module


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("name", [m for m in MODULES if m != f"{PACKAGE}.__main__"])  # __main__ runs the CLI
def test_module_imports(name):
    importlib.import_module(name)


def test_no_import_circles():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_arrows_go_the_allowed_way():
    bad = []
    for m, targets in sorted(GRAPH.items()):
        part = _part(m)
        for t in sorted(targets):
            other = _part(t)
            if other == part:
                continue
            if (part in ALLOWED and other not in ALLOWED[part]) or other in FORBIDDEN.get(part, ()):
                bad.append(f"{m} -> {t}")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_graph_sees_relative_and_function_level_imports():
    assert f"{PACKAGE}.cli" in GRAPH[f"{PACKAGE}.__main__"]
    assert f"{PACKAGE}.serving.launch" in GRAPH[f"{PACKAGE}.launch_server"]  # imported inside main()
