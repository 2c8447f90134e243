"""The shape of the code base: files a reader can take in at one sitting, and no import cycles.

The import graph is read from the source (nothing is imported): every ``import`` / ``from ... import``
of a ``pretrain`` or ``pretrain_kernels`` (the ``kernels/`` folder) module at any depth, function-level
lazy imports included, because a lazy import that closes a cycle still ties the two modules together.
An edge goes to what the statement names: ``from pretrain.a import b`` is an edge to the submodule
``pretrain.a.b``, and to the package ``pretrain.a`` only when a name comes from its ``__init__``. The
parent packages that Python initialises before a submodule are not edges: they run before the
submodule's code, so they can only close a cycle through an import that names them, which is in
the graph.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# Import name -> source folder (pyproject's package-dir installs kernels/ as pretrain_kernels).
ROOTS = {"pretrain": REPO / "pretrain", "pretrain_kernels": REPO / "kernels"}

Graph = dict[str, set[str]]
# (importer, imported) -> the import statements that make the edge: "path:line: source"
Sites = dict[tuple[str, str], list[str]]


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under each root (a package is its __init__.py)."""
    modules = {}
    for top, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The known modules an import statement names (submodules of ``from X import y`` included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    # The package itself only when a name comes from its __init__ (not when every name is a submodule).
    from_init = base in known and len(submodules) < len(node.names)
    return ([base] if from_init else []) + submodules


def import_graph(modules: dict[str, Path], root: Path = REPO) -> tuple[Graph, Sites]:
    """Edges importer -> imported among ``modules``, and the source lines that make each edge."""
    known = set(modules)
    graph: Graph = {name: set() for name in modules}
    sites: Sites = {}
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            for imported in _imported(node, module, path.name == "__init__.py", known):
                if imported != module:
                    graph[module].add(imported)
                    where = f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                    sites.setdefault((module, imported), [])
                    if where not in sites[(module, imported)]:
                        sites[(module, imported)].append(where)
    return graph, sites


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those that are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def shortest_cycle(graph: Graph, component: Iterable[str]) -> list[str]:
    """One shortest cycle through the component's first member, as [a, b, ..., a] (breadth-first)."""
    members = set(component)
    start = min(members)
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{sorted(members)} is not a cycle")


def _first(lines: list[str], n: int = 3) -> str:
    return " | ".join(lines[:n]) + (f" (+{len(lines) - n} more)" if len(lines) > n else "")


def describe_cycles(graph: Graph, sites: Sites) -> list[str]:
    """For each cycle: its modules, then one shortest loop through it with the import line of each step."""
    reports = []
    for component in strongly_connected(graph):
        loop = shortest_cycle(graph, component)
        steps = [f"    {a} -> {b}: {_first(sites[(a, b)])}" for a, b in zip(loop, loop[1:])]
        reports.append(f"cycle among {', '.join(component)}:\n" + "\n".join(steps))
    return reports


def test_no_file_is_over_400_lines():
    offenders = []
    for folder in ROOTS.values():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                count = len(path.read_text().splitlines())
            except UnicodeDecodeError:  # a binary file has no lines to read
                continue
            if count > MAX_LINES:
                offenders.append(f"{path.relative_to(REPO)}: {count} lines")
    assert not offenders, f"files over {MAX_LINES} lines (split them):\n" + "\n".join(offenders)


def test_no_import_cycles():
    modules = module_files(ROOTS)
    assert "pretrain.model.layers" in modules and "pretrain_kernels.ops" in modules
    graph, sites = import_graph(modules)
    cycles = describe_cycles(graph, sites)
    assert not cycles, "import cycles (each loop is shown with the import lines that make it):\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a", "e"}, "f": {"g"}, "g": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"], ["f", "g"]]
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert shortest_cycle(graph, ["e"]) == ["e", "e"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_lazy_relative_and_package_imports(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from pkg.sub.b import thing\n",
        "pkg/a.py": "def f():\n    from pkg.sub import b  # lazy, and b is a submodule\n",
        "pkg/sub/b.py": "from .. import a\nthing = 1\n",
        "pkg/sub/c.py": "import pkg.a\n",
        "pkg/d.py": "import os\nfrom pkg.sub.b import thing\n",
        "pkg/e.py": "from pkg.sub import thing\n",  # a name from pkg.sub's __init__: an edge to the package
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = module_files({"pkg": tmp_path / "pkg"})
    graph, sites = import_graph(modules, root=tmp_path)
    assert graph["pkg.a"] == {"pkg.sub.b"}  # a submodule named through its package
    assert graph["pkg.sub.b"] == {"pkg.a"}  # `from .. import a` resolves to pkg.a
    assert graph["pkg.sub.c"] == {"pkg.a"}  # not its own package: it does not name it
    assert graph["pkg.d"] == {"pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.e"] == {"pkg.sub"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub.b"]]
    assert sites[("pkg.a", "pkg.sub.b")] == ["pkg/a.py:2: from pkg.sub import b  # lazy, and b is a submodule"]
    (report,) = describe_cycles(graph, sites)
    assert "pkg.a -> pkg.sub.b: pkg/a.py:2" in report and "pkg/sub/b.py:1: from .. import a" in report
