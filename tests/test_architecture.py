"""The import graph keeps the layering: no package cycle, `pricing` pure, one composition root;
and every query lives in a repository.

A node is a package of `service/` (`service.invoices`), a top-level module of it
(`service.deps`) or `pricing`; an edge is any import between two nodes, wherever it
stands (inside a function or under `TYPE_CHECKING` too: a cycle in the types is a cycle in
the design). `python -m tests.test_architecture [ROOT]` prints the graph and its cycles.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The composition root, and the only modules that may import it.
RUNTIME = "service.runtime"
RUNTIME_IMPORTERS = {"service/app.py", "service/deps.py"}
# What the pure library never imports (beside `service`).
IMPURE = ("sqlalchemy", "fastapi", "starlette", "asyncpg")

# A query is a statement built with SQLAlchemy (`select(`, `text(`, …), or one run on a
# session or connection (`.execute(`, `.fetch(`, …) by a module that imports SQLAlchemy or
# asyncpg (so a Redis pipeline's `execute` is none). Its home is a repository module
# (`repository.py`, or a module of a `repository/` package; `service/db/repository.py`
# holds the idiom). Raw asyncpg is for the ledger writer and the task guard, which hold
# connections of their own: their queries too are in repositories (`ledger`, `tasks`).
SQL_BUILDERS = {"select", "text", "insert", "update", "delete", "exists", "union_all"}
RUN_METHODS = {
    "execute",
    "executemany",
    "scalar",
    "scalars",
    "fetch",
    "fetchrow",
    "fetchval",
    "copy_records_to_table",
    "copy_to_table",
    "copy_from_query",
}
QUERY_HOMES = {
    "service/db/models.py": "the schema: server defaults and constraints are SQL expressions",
    "service/db/engine.py": "the transaction's settings (SET LOCAL), no data",
    "service/db/channels.py": "pg_notify, beside the channel names it is sent on",
}


def node_of(module: str) -> str | None:
    """The graph node a dotted module belongs to; None outside `service` and `pricing`."""
    parts = module.split(".")
    if parts[0] == "pricing":
        return "pricing"
    if parts[0] == "service" and len(parts) > 1:
        return ".".join(parts[:2])
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module `tree` imports, absolute, with its line (`from a import b` counts `a.b`:
    `b` may be a module)."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def is_repository(path: str) -> bool:
    parts = path.removesuffix(".py").split("/")
    return parts[-1] == "repository" or "repository" in parts[:-1]


def queries(source: str) -> list[tuple[int, str]]:
    """The queries a module writes, with their lines (see `SQL_BUILDERS`, `RUN_METHODS`)."""
    tree = ast.parse(source)
    builders: set[str] = set()
    speaks_sql = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in ("sqlalchemy", "asyncpg"):
                speaks_sql = True
                builders |= {a.asname or a.name for a in node.names if a.name in SQL_BUILDERS}
        elif isinstance(node, ast.Import):
            speaks_sql |= any(a.name.split(".")[0] in ("sqlalchemy", "asyncpg") for a in node.names)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in builders:
            found.append((node.lineno, f"{node.func.id}("))
        elif speaks_sql and isinstance(node.func, ast.Attribute) and node.func.attr in RUN_METHODS:
            found.append((node.lineno, f".{node.func.attr}("))
    return sorted(found)


def queries_by_module(root: Path = ROOT) -> dict[str, list[tuple[int, str]]]:
    return {
        path.relative_to(root).as_posix(): found
        for path in sorted(root.glob("service/**/*.py"))
        if (found := queries(path.read_text()))
    }


@dataclass
class Graph:
    # node -> node -> the import sites ("service/x/y.py:12") that make the edge
    edges: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))
    # file -> the modules it imports, with lines
    imports: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    @property
    def nodes(self) -> set[str]:
        return set(self.edges) | {b for targets in self.edges.values() for b in targets}

    def cycles(self) -> list[list[str]]:
        """The strongly connected groups of more than one node (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in self.edges.get(v, {}):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

        for v in sorted(self.nodes):
            if v not in index:
                visit(v)
        return sorted(groups)

    def importers_of(self, module: str) -> set[str]:
        """The files that import `module` (or anything inside it)."""
        return {
            path
            for path, imported in self.imports.items()
            if any(name == module or name.startswith(module + ".") for name, _ in imported)
        }

    def describe(self, group: list[str]) -> list[str]:
        """The edges inside a group, each with where it is imported."""
        return [
            f"{a} -> {b}  ({', '.join(self.edges[a][b])})"
            for a in group
            for b in sorted(self.edges.get(a, {}))
            if b in group
        ]


def build(root: Path = ROOT) -> Graph:
    graph = Graph()
    files = sorted([*root.glob("service/**/*.py"), *root.glob("pricing/**/*.py")])
    for path in files:
        module = _module_name(path, root)
        source = node_of(module) or module  # `service/__init__.py` is a node of its own
        rel = path.relative_to(root).as_posix()
        imported = _imported(ast.parse(path.read_text()), module, path.name == "__init__.py")
        graph.imports[rel] = imported
        for target_module, line in imported:
            target = node_of(target_module)
            if target is not None and target != source:
                graph.edges[source].setdefault(target, []).append(f"{rel}:{line}")
    for targets in graph.edges.values():
        for sites in targets.values():
            sites[:] = sorted(set(sites))
    return graph


GRAPH = build()


def test_no_package_imports_in_a_cycle() -> None:
    cycles = GRAPH.cycles()
    assert not cycles, "package cycles:\n" + "\n".join(
        line for group in cycles for line in [" <-> ".join(group), *GRAPH.describe(group)]
    )


def test_pricing_stays_pure() -> None:
    impure = [
        f"{path}:{line} imports {module}"
        for path, imported in GRAPH.imports.items()
        if path.startswith("pricing/")
        for module, line in imported
        if module.split(".")[0] in ("service", *IMPURE)
    ]
    assert not impure


def test_only_the_app_and_its_dependencies_import_the_runtime() -> None:
    assert GRAPH.importers_of(RUNTIME) <= RUNTIME_IMPORTERS


def test_the_graph_sees_the_imports_it_checks() -> None:
    """The checks above would pass on an empty graph: this one says they read the tree."""
    assert GRAPH.edges["service.app"].keys() >= {RUNTIME, "service.deps", "service.proxy"}
    assert "service.db" in GRAPH.edges["service.deps"]
    assert "pricing" in GRAPH.edges["service.invoices"]
    assert "pricing" not in GRAPH.edges
    cyclic = Graph()
    cyclic.edges["service.a"]["service.b"] = ["a.py:1"]
    cyclic.edges["service.b"]["service.a"] = ["b.py:1"]
    assert cyclic.cycles() == [["service.a", "service.b"]]


QUERIES = queries_by_module()


def test_queries_live_in_repositories() -> None:
    stray = [
        f"{path}:{line} {what}"
        for path, found in QUERIES.items()
        if not is_repository(path) and path not in QUERY_HOMES
        for line, what in found
    ]
    assert not stray, "queries outside a repository:\n" + "\n".join(stray)


def test_every_exception_to_the_repository_rule_is_still_needed() -> None:
    assert not QUERY_HOMES.keys() - QUERIES.keys()


def test_the_query_check_sees_the_queries_it_checks() -> None:
    """The check above would pass if it found nothing: this one says it reads queries."""
    assert {"service/accounts/repository.py", "service/invoices/repository/sums.py"} <= set(QUERIES)
    assert is_repository("service/invoices/repository/sums.py")
    assert not is_repository("service/invoices/service.py")
    stray = "from sqlalchemy import select as s\nasync def f(db):\n    await db.scalars(s(1))\n"
    assert queries(stray) == [(3, ".scalars("), (3, "s(")]
    assert queries("import asyncpg\nasync def f(c):\n    await c.fetchval('x')\n") == [
        (3, ".fetchval(")
    ]
    # A Redis pipeline's `execute` is no query.
    assert queries("async def f(pipe):\n    await pipe.execute()\n") == []


def main(root: Path) -> None:
    graph = build(root)
    print(f"packages: {len(graph.nodes)}")
    for node in sorted(graph.nodes):
        print(f"{node} -> {', '.join(sorted(graph.edges.get(node, {}))) or '-'}")
    cycles = graph.cycles()
    print(f"cycles: {len(cycles)}")
    for group in cycles:
        print("  " + " <-> ".join(group))
        for line in graph.describe(group):
            print("    " + line)
    print(f"importers of {RUNTIME}: {', '.join(sorted(graph.importers_of(RUNTIME))) or '-'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
