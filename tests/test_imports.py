"""The package's import structure: every module imports on its own, and no module imports itself
back through others (the static import graph is acyclic, ``if TYPE_CHECKING:`` imports aside).

An import cycle works only as long as every module on it happens to be imported in one order;
imported first from elsewhere, one of them sees a half-initialised module. The graph is read from
the source with :mod:`ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = "ponderlm"


# ------------------------------------------------------------------ the graph
def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by __init__.py)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` (functions and classes included), skipping the body
    of ``if TYPE_CHECKING:`` blocks (their ``else`` still runs)."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: Iterable[ast.AST] = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _import_nodes(child)


def _resolve_from(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` in module ``name`` names as X."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports. ``from P import x`` counts as an
    import of ``P.x`` when that is a module, else of ``P``; importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b``, unless that package encloses the importer (it is already importing)."""
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        base = _resolve_from(name, is_package, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in known else base)
    found = set()
    for t in targets:
        while t and t not in known:  # `import ponderlm.x.y` of a name that is not a module
            t = t.rpartition(".")[0]
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            encloses = name == mod or name.startswith(mod + ".")
            if mod in known and mod != name and (i == len(parts) or not encloses):
                found.add(mod)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source)."""
    files = module_files(root, package)
    known = set(files)
    return {
        name: imported_modules(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", known)
        for name, path in files.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself),
    each as a sorted list: empty when the graph is acyclic (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:  # node is the root of a component: pop it
            comp = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(comp) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(comp))

    for start in sorted(graph):
        if start not in index:
            visit(start)
    return cycles


# ------------------------------------------------------------------ the checker, on graphs made up here
def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}})
    assert sorted(two) == [["a", "b"], ["c", "d"]]


def test_import_graph_reads_sources(tmp_path):
    """Relative and absolute imports, imports inside functions, ``from P import module``, package
    __init__s, and the TYPE_CHECKING exemption, on a package written here (with a cycle)."""
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n    import pk.sub.d\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..b import f\n")
    (pkg / "sub" / "d.py").write_text("import os\nfrom . import c\n")
    g = import_graph(tmp_path, "pk")
    assert g == {
        "pk": {"pk.a"},
        "pk.a": set(),  # the TYPE_CHECKING import is not followed
        "pk.b": {"pk.sub", "pk.sub.c", "pk.sub.d"},
        "pk.sub": set(),
        "pk.sub.c": {"pk.a", "pk.b"},  # pk.sub encloses the importer: not an edge
        "pk.sub.d": {"pk.sub.c"},
    }
    assert find_cycles(g) == [["pk.b", "pk.sub.c", "pk.sub.d"]]
    (pkg / "a.py").write_text("from .b import f\n")  # the same import outside TYPE_CHECKING: a cycle
    assert find_cycles(import_graph(tmp_path, "pk")) == [["pk.a", "pk.b", "pk.sub.c", "pk.sub.d"]]


# ------------------------------------------------------------------ the package
def test_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "ponderlm.model.model" in graph["ponderlm.model.losses"]  # the graph was read
    assert find_cycles(graph) == []


IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for mod in [m for m in sys.modules if m == "ponderlm" or m.startswith("ponderlm.")]:
        del sys.modules[mod]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module imports first, with no other ponderlm module loaded before it (third-party
    modules stay loaded between them, which keeps this to one interpreter and a few seconds).
    ``ponderlm.__main__`` is the command itself: importing it runs it."""
    names = sorted(set(module_files()) - {"ponderlm.__main__"})
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
