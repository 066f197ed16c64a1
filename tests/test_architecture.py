"""The layout's rules, read from the source: every module imports, no import cycle, no upward import.

The import graph is built with `ast` from src/dpokit: an edge for every `import` of a dpokit module, at module
level or inside a function. An import inside a function (a lazy one) runs later, so a cycle through it does not
break the import at runtime, but the modules still depend on each other both ways; it counts. Imports under
`if TYPE_CHECKING:` never run and do not count.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Offending edges the current layout still has, each "importer -> imported"; an entry goes when its edge does, and
# the test fails while any edge is left, known or not.
KNOWN_EDGES: list[str] = []

# Lower layers: the data, the losses and log-probs, the config and errors. They never import a command module.
LOWER = ("dpokit.data", "dpokit.losses", "dpokit.f_divergences", "dpokit.logprobs", "dpokit.config", "dpokit.errors")
# Command modules: what a `dpokit` command runs. A name that is not (or no longer) a module matches nothing.
COMMANDS = (
    "dpokit.cli",
    "dpokit.train",
    "dpokit.sft",
    "dpokit.evaluate",
    "dpokit.compare",
    "dpokit.onpolicy",
    "dpokit.chat",
    "dpokit.vibe",
    "dpokit.merge",
    "dpokit.report",
    "dpokit.demo",
)
KERNELS = ("dpokit.attention", "dpokit.flex")  # model kernels, which the data layer never imports
ONLY_MAIN_IMPORTS_CLI = {"dpokit.__main__"}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    lines: tuple[int, ...]
    lazy: bool  # every import of it is inside a function

    def __str__(self) -> str:
        where = ", ".join(map(str, self.lines))
        return f"{self.importer} -> {self.imported} (line {where}{', inside a function' if self.lazy else ''})"


def module_files() -> dict[str, Path]:
    """`dpokit.data.collate` -> its file; a package is named by its `__init__.py`."""
    files = {}
    for path in sorted((SRC / "dpokit").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> set[str]:
    """The dpokit modules an import statement loads: `from a import b` loads the module `a.b` if there is one,
    else takes the name `b` from `a`."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {owner for owner in (_owning_module(name, modules) for name in names) if owner}


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported dpokit module, line, inside a function) for every import in `path` that runs."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom):
                imported = _imported_names(child, package, modules)
                found.extend((name, child.lineno, inner) for name in sorted(imported) if name != module)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph() -> dict[tuple[str, str], Edge]:
    modules = module_files()
    seen: dict[tuple[str, str], list[tuple[int, bool]]] = {}
    for module, path in modules.items():
        for imported, line, lazy in imports_of(module, path, modules):
            seen.setdefault((module, imported), []).append((line, lazy))
    return {
        key: Edge(*key, tuple(line for line, _ in uses), all(lazy for _, lazy in uses)) for key, uses in seen.items()
    }


def cycle_edges(edges: dict[tuple[str, str], Edge]) -> list[Edge]:
    """Every edge that lies on a cycle: both its ends in one strongly connected component (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for importer, imported in edges:
        graph.setdefault(importer, []).append(imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    component: dict[str, int] = {}

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            while True:
                member = stack.pop()
                component[member] = index[node]
                if member == node:
                    break

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [edge for (a, b), edge in sorted(edges.items()) if component.get(a) == component.get(b, -1)]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(edges: dict[tuple[str, str], Edge]) -> list[tuple[Edge, str]]:
    found = []
    for (importer, imported), edge in sorted(edges.items()):
        if _within(importer, LOWER) and _within(imported, COMMANDS):
            found.append((edge, "a lower layer imports a command module"))
        if _within(importer, ("dpokit.data",)) and _within(imported, KERNELS):
            found.append((edge, "the data layer imports a model kernel"))
        if imported == "dpokit.cli" and importer not in ONLY_MAIN_IMPORTS_CLI:
            found.append((edge, "only __main__ imports the command line"))
    return found


def test_every_module_imports() -> None:
    for module in module_files():
        importlib.import_module(module)


def test_graph_sees_lazy_and_from_imports() -> None:
    """The graph reader on this repository's own habits: a lazy `from dpokit import x` inside a function is an edge
    to dpokit.x, `from dpokit.x import name` one to dpokit.x, and TYPE_CHECKING imports none."""
    edges = import_graph()
    assert ("dpokit.__main__", "dpokit.cli") in edges and not edges["dpokit.__main__", "dpokit.cli"].lazy
    init_to_config = edges["dpokit", "dpokit.config"]  # `from dpokit import config` in `__getattr__`
    assert init_to_config.lazy and len(init_to_config.lines) == 1  # the TYPE_CHECKING import is not counted
    assert ("dpokit.train", "dpokit.losses") in edges and ("dpokit.losses", "dpokit.f_divergences") in edges
    assert not any(imported == importer for importer, imported in edges)


def test_cycle_finder_on_a_known_graph() -> None:
    def edge(a: str, b: str) -> tuple[tuple[str, str], Edge]:
        return (a, b), Edge(a, b, (1,), False)

    graph = dict([edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "d"), edge("d", "e"), edge("e", "d")])
    assert [(e.importer, e.imported) for e in cycle_edges(graph)] == [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("d", "e"),
        ("e", "d"),
    ]


def test_no_import_cycle_and_no_upward_import() -> None:
    edges = import_graph()
    problems = [(edge, "on an import cycle") for edge in cycle_edges(edges)] + layer_violations(edges)
    offending = {f"{edge.importer} -> {edge.imported}" for edge, _ in problems}
    lines = [
        f"{edge}: {why}{' (known)' if f'{edge.importer} -> {edge.imported}' in KNOWN_EDGES else ''}"
        for edge, why in problems
    ]
    lines += [
        f"{known}: no longer found, delete it from KNOWN_EDGES" for known in KNOWN_EDGES if known not in offending
    ]
    if lines:
        pytest.fail(f"{len(lines)} import(s) break the layout:\n" + "\n".join(lines), pytrace=False)


def test_layer_rules_on_a_known_graph() -> None:
    edges = {
        (a, b): Edge(a, b, (1,), True)
        for a, b in [
            ("dpokit.config", "dpokit.cli"),  # lower -> command, and not __main__ -> cli
            ("dpokit.data.collate", "dpokit.flex"),  # data -> kernel
            ("dpokit.losses", "dpokit.train"),  # lower -> command
            ("dpokit.train", "dpokit.losses"),  # command -> lower: fine
            ("dpokit.__main__", "dpokit.cli"),  # fine
            ("dpokit.data.sft", "dpokit.data.formats"),  # data/sft.py is the data layer, not the `sft` command
        ]
    }
    found = [(e.importer, e.imported, why) for e, why in layer_violations(edges)]
    assert found == [
        ("dpokit.config", "dpokit.cli", "a lower layer imports a command module"),
        ("dpokit.config", "dpokit.cli", "only __main__ imports the command line"),
        ("dpokit.data.collate", "dpokit.flex", "the data layer imports a model kernel"),
        ("dpokit.losses", "dpokit.train", "a lower layer imports a command module"),
    ]
