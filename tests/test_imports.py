"""No import cycles inside the nlrw_jax package.

The graph is read from the source with `ast` (nothing is imported): every `import x` and
`from x import y` anywhere in a module, inside functions too, since a cycle hidden behind a
function-level import is still a cycle in the design. Relative imports are resolved; only
edges to nlrw_jax modules are kept; `from nlrw_jax.pkg import mod` points at nlrw_jax.pkg.mod
where that module exists, else at nlrw_jax.pkg; a package's __init__.py is the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nlrw_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under root (a package is its __init__.py)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that module `name` (at `path`) imports."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this module's package (a package's own, for __init__)
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import mod` imports the submodule pkg.mod if there is one, else a name from pkg
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` runs a, a.b and a.b.c; the deepest one in the package stands for the edge
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_names(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a, as a list ending where it starts) per strongly connected
    component that has one (Tarjan's algorithm, iterative), plus every self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == v:
                            break
                    sccs.append(sorted(scc))
    cycles = [[v, v] for v in sorted(graph) if v in graph[v]]
    for scc in sccs:
        if len(scc) > 1:
            cycles.append(_cycle_through(scc[0], set(scc), graph))
    return sorted(cycles)


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start within one strongly connected component (BFS)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start}: no cycle in its component")  # cannot happen for a real SCC


# ------------------------------------------------------------------------------------- tests


def test_cycle_finder_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": {"g"}, "h": set()}
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["a", "b", "c", "a"], ["d", "e", "d"], ["g", "g"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_graph_reader_resolves_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from nlrw_jax.sub import b\nimport os\n",
        "sub/__init__.py": "from . import c\n",
        "sub/b.py": "def f():\n    from ..a import x\n",  # inside a function, relative
        "sub/c.py": "import nlrw_jax.sub.missing\nfrom nlrw_jax.sub import helper\nfrom nlrw_jax import a\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "nlrw_jax": set(),
        "nlrw_jax.a": {"nlrw_jax.sub.b"},
        "nlrw_jax.sub": {"nlrw_jax.sub.c"},
        "nlrw_jax.sub.b": {"nlrw_jax.a"},
        "nlrw_jax.sub.c": {"nlrw_jax.sub", "nlrw_jax.a"},
    }
    assert find_cycles(graph) == [["nlrw_jax.a", "nlrw_jax.sub.b", "nlrw_jax.a"],
                                  ["nlrw_jax.sub", "nlrw_jax.sub.c", "nlrw_jax.sub"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "nlrw_jax.llm.backends" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in nlrw_jax:\n" + "\n".join(" -> ".join(c) for c in cycles)
