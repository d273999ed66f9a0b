"""Package structure: no import circles anywhere in uvmbus, and the simulated host never
imports the guest drivers' message code (BRIEF: "the host side shares only wire layouts with
the guest, never its message code"; "no import circles").

The graph is read from the source (every ``import`` statement, including those inside
functions and ``if TYPE_CHECKING:`` blocks: a deferred import is still a dependency).  The
implicit import of a parent package's ``__init__`` is not an edge (``from pkg import mod``
depends on ``pkg.mod``), as in every import-cycle checker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "uvmbus"

#: guest driver packages: the simulator's models may use none of them
GUEST_DRIVERS = ("uvmbus.netvsc", "uvmbus.storvsc", "uvmbus.ic", "uvmbus.nvme")


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(pkg: Path = PKG) -> dict[str, Path]:
    return {module_name(p, pkg.parent): p for p in sorted(pkg.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        # the longest known module that target names (a.b.c.func → a.b.c)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                add(sub if sub in known else mod)
    return out


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = modules(pkg)
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import circles (break them: move the shared part down a layer):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_simulator_never_imports_guest_driver_code() -> None:
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("uvmbus.sim")
                 for t in targets if t.startswith(GUEST_DRIVERS))
    assert not bad, ("the simulated host may share only wire layouts (native/*_wire.h via ffi) "
                     "with the guest, never its message code:\n" + "\n".join(bad))


def test_trace_never_imports_driver_code() -> None:
    """trace/ sits below the drivers (docs/architecture.md): what its decoder and dissector name
    comes from the wire headers through ffi/lib, never from a driver package."""
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, targets in graph.items()
                 if m == "uvmbus.trace" or m.startswith("uvmbus.trace.")
                 for t in targets if t.startswith(GUEST_DRIVERS))
    assert not bad, ("uvmbus.trace sits below the drivers: take what it needs from the wire "
                     "headers (native/*_wire.h via ffi/lib):\n" + "\n".join(bad))


def test_checker_sees_cycles_and_forbidden_imports(tmp_path: Path) -> None:
    """The checker itself: a deferred (in-function / TYPE_CHECKING) import closes a circle, a
    relative import counts, and a model importing a guest driver is found."""
    pkg = tmp_path / "uvmbus"
    for d in ("sim/models", "netvsc"):
        (pkg / d).mkdir(parents=True)
    files = {
        "__init__.py": "",
        "sim/__init__.py": "",
        "sim/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from uvmbus.sim.b import B\n",
        "sim/b.py": "def f():\n    from . import a\n",
        "sim/models/__init__.py": "",
        "sim/models/m.py": "from uvmbus.netvsc import protocol as P\n",
        "netvsc/__init__.py": "",
        "netvsc/protocol.py": "X = 1\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert cycles(graph) == [["uvmbus.sim.a", "uvmbus.sim.b"]]
    assert "uvmbus.netvsc.protocol" in graph["uvmbus.sim.models.m"]


@pytest.mark.parametrize("pkg", ["sim", "storvsc"])
def test_named_packages_have_no_internal_circles(pkg: str) -> None:
    """The two packages issue 9 named (8 files in uvmbus/sim, 3 in uvmbus/storvsc)."""
    graph = import_graph()
    sub = {m: {t for t in ts if t.startswith(f"uvmbus.{pkg}")} for m, ts in graph.items()
           if m.startswith(f"uvmbus.{pkg}")}
    assert cycles(sub) == []
