"""Import cycles between the modules of a package, found from the source alone (no import runs).

    python tools/import_cycles.py [PACKAGE_DIR] [--top-level-only]

Every `import` and `from ... import` counts, also those inside functions (a lazy import that
closes a circle is still a circle: it only moves the failure to run time, or hides a layer
that depends on one above it); imports under `if TYPE_CHECKING:` do not (they never run).
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg` (its
`__init__`). A parent package's `__init__` that an import runs on the way is not counted as
an edge, as import linters do not.

Prints each strongly connected group of modules (every module in it reaches every other)
with one shortest cycle through it, lazy edges marked `~>`; exits 1 if any group is found.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package directory `root`."""
    names = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, top_level: bool = True):
    """(node, lazy) for every import statement, skipping `if TYPE_CHECKING:` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from ((n, lazy) for child in node.orelse for n, lazy in _imports_of(child, top_level))
            continue
        yield from _imports_of(node, top_level)


def _imports_of(node: ast.AST, top_level: bool):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, not top_level
        return
    inner = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    yield from _imports(node, inner)


def edges(names: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported module: lazy}; an edge is lazy only if every import along it is."""
    graph: dict[str, dict[str, bool]] = {name: {} for name in names}
    for name, file in names.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(file.read_text(), str(file))
        for node, lazy in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                           for alias in node.names]
            for target in targets:
                # `import a.b.c` binds a module that exists; climb to the nearest one we know.
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name][target] = graph[name].get(target, True) and lazy
    return graph


def strongly_connected(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (deep packages must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def shortest_cycle(graph: dict[str, dict[str, bool]], group: list[str]) -> list[str]:
    """A shortest cycle inside `group` through its first module (breadth-first)."""
    members, start = set(group), group[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in graph[node]:
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "graft"))
    parser.add_argument("--top-level-only", action="store_true",
                        help="ignore imports inside functions (the cycles that break at import time)")
    args = parser.parse_args(argv)
    names = module_names(Path(args.package).resolve())
    graph = edges(names)
    if args.top_level_only:
        graph = {m: {t: lazy for t, lazy in out.items() if not lazy} for m, out in graph.items()}
    groups = strongly_connected(graph)
    for group in groups:
        cycle = shortest_cycle(graph, group)
        steps = [cycle[0]]
        for a, b in zip(cycle, cycle[1:]):
            steps.append(("~> " if graph[a][b] else "-> ") + b)
        print(f"{len(group)} modules: {', '.join(group)}")
        print(f"  cycle: {' '.join(steps)}")
    print(f"{len(groups)} cycle group(s) among {len(names)} modules"
          + (" (top-level imports only)" if args.top_level_only else " (lazy imports included, shown ~>)"))
    return 1 if groups else 0


if __name__ == "__main__":
    sys.exit(main())
