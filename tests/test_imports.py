"""The package's import graph has no cycles, and the layers import one way (STYLE.md).

Every ``import`` and ``from .. import ..`` of every module of ``qvl_export`` counts, at module level and
inside functions (a lazy import hides a cycle from Python, not from the design); ``from pkg import name``
counts as an import of the submodule ``pkg.name`` when there is one, else of ``pkg``. Read with ``ast``:
nothing is imported, so the test runs without torch, onnxruntime or tensorrt.

An import of ``a.b.c`` is an edge to ``a.b.c`` only (not to the packages above it): a package whose
``__init__`` re-exports its submodules is not a cycle with them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qvl_export

ROOT = Path(qvl_export.__file__).resolve().parent
PKG = ROOT.name


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _known(name: str) -> str:
    """``name`` or the nearest module above it that exists (an attribute import resolves to its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(_known(a.name) for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != PKG:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in MODULES else _known(source))
    out.discard(module)
    out.discard("")
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _package(module: str) -> str:
    """``qvl_export.<pkg>`` (a top-level module such as ``qvl_export.cli`` is its own package)."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_in(graph, set(comp)) for comp in components]


def _path_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first node of ``comp`` (breadth-first inside the component)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_lazy_and_from_imports():
    """Guards the walker itself: function-level imports and ``from pkg import submodule`` are edges."""
    assert f"{PKG}.passes" in GRAPH[f"{PKG}.cli"]  # imported inside the ``passes`` command
    assert f"{PKG}.core.precisions" in GRAPH[f"{PKG}.building.stages"]  # from qvl_export.core import precisions


def test_no_module_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles between modules:\n" + _describe(cycles)


def test_no_package_cycles():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps)
    for pkg, deps in packages.items():
        deps.discard(pkg)
    cycles = _cycles(packages)
    assert not cycles, "import cycles between packages:\n" + _describe(cycles)


def _outside(layer: str, allowed: set[str]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _package(m) == f"{PKG}.{layer}"
                  for d in deps if _package(d) not in {f"{PKG}.{a}" for a in allowed} and d != PKG)


def test_core_is_the_bottom_layer():
    bad = _outside("core", {"core"})
    assert not bad, "core imports nothing of qvl_export outside core:\n" + "\n".join(bad)


def test_runtimes_depend_on_core_only():
    bad = _outside("runtimes", {"core", "runtimes"})
    assert not bad, "runtimes import only core and runtimes:\n" + "\n".join(bad)


def test_serving_depends_on_runtimes_and_core_only():
    bad = _outside("serving", {"core", "runtimes", "serving"})
    assert not bad, "serving imports only core, runtimes and serving:\n" + "\n".join(bad)
