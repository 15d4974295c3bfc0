"""The package's import graph has no cycle, counting imports inside functions.

A function-level import can keep a cycle alive that a module-level import would break at import time; this
test sees both, so a cycle cannot hide behind one. Edges:

- ``import a.b.c`` and ``from a.b import c`` (``c`` a module) depend on ``a.b.c``; ``from a.b import name``
  (``name`` not a module) on ``a.b``, whose ``__init__`` defines it;
- importing ``a.b.c`` also runs the ``__init__`` of every package on the way (``a.b``) that is not an
  ancestor of the importing module (its ancestors are already importing when it runs);
- imports under ``if TYPE_CHECKING:`` are not run, so they are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import recurrent_lens

PACKAGE = Path(recurrent_lens.__file__).parent

KNOWN_CYCLES: list[set[str]] = []
"""Cycles that are known and still to be removed; a new one fails, and so does one of these once it is gone."""


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The package modules that an import statement names (before the packages on the way are added)."""
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            name = alias.name
            while name and name not in modules:
                name = name.rpartition(".")[0]
            found += [name] if name else []
        return found
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = []
    for alias in node.names:
        target = f"{base}.{alias.name}"
        found += [target] if target in modules else [base] if base in modules else []
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the package modules its import statements run}``, over every module of ``package``."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        home = module if is_package else module.rpartition(".")[0]
        pending: list[ast.AST] = [ast.parse(path.read_text())]
        while pending:
            node = pending.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    pending += child.orelse
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _imported(child, module, is_package, modules):
                        graph[module].add(target)
                        parts = target.split(".")
                        for i in range(1, len(parts)):
                            package = ".".join(parts[:i])
                            if package in modules and not (home == package or home.startswith(package + ".")):
                                graph[module].add(package)
                pending.append(child)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: set[str], graph: dict[str, set[str]]) -> str:
    return "\n".join(f"  {a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component))


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n\n".join(_describe(c, graph) for c in new)
    gone = [c for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_the_graph_sees_imports_inside_functions_and_packages_on_the_way(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nfrom pkg.sub.c import h\n",
        "sub/__init__.py": "from pkg import a\n",
        "sub/c.py": "from .d import z\nimport torch\n",
        "sub/d.py": "",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub", "pkg.sub.c"}, "pkg.sub": {"pkg.a"},
                     "pkg.sub.c": {"pkg.sub.d"}, "pkg.sub.d": set()}
    assert cycles(graph) == [{"pkg.a", "pkg.b", "pkg.sub"}]


def test_cycles_finds_a_cycle_and_only_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["e"]]
