"""Architecture metrics of the package: its shape (top-level modules, the largest modules and
classes, import cycles, imports that run up the layering of docs/DESIGN.md's package map) and its
functions (the longest, the worst cyclomatic complexity by ruff's C901, method-name comparisons
outside ``model/config.py``).

    python benchmarks/architecture_metrics.py            # this checkout (ruff on PATH: the venv)
    python benchmarks/architecture_metrics.py OTHER_TREE # e.g. a git worktree of an older commit
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_imports import find_cycles, import_graph

# docs/DESIGN.md, "The package map": a module may import its own layer and those below it
LAYERS = [
    ("ponderlm.errors", "ponderlm._version", "ponderlm.progress", "ponderlm.threads", "ponderlm.limits",
     "ponderlm.device", "ponderlm.owned"),
    ("ponderlm.model",),
    ("ponderlm.data", "ponderlm.runs"),
    ("ponderlm.hf.modeling", "ponderlm.hf.load", "ponderlm.hf.register", "ponderlm.hf", "ponderlm._autoregister"),
    ("ponderlm.loading",),
    ("ponderlm.eval", "ponderlm.serving", "ponderlm.hf.export", "ponderlm.hf.convert"),
    ("ponderlm.training",),
    ("ponderlm.experiments",),
    ("ponderlm.cli", "ponderlm.__main__", "ponderlm"),
]  # fmt: skip


def layer(module: str) -> int:
    best = (-1, -1)  # (length of the longest matching prefix, its layer)
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best[0]:
                best = (len(name), i)
    return best[1]


def shape(root: Path) -> None:
    pkg = root / "ponderlm"
    top = sorted(p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    subs = sorted(p.parent.name for p in pkg.glob("*/__init__.py"))
    print(f"top-level modules: {len(top)} {top}")
    print(f"subpackages: {len(subs)} {subs}")
    mods = sorted(
        ((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in pkg.rglob("*.py")), reverse=True
    )
    print("largest modules:", mods[:5], "over 600 lines:", sum(n > 600 for n, _ in mods))
    classes = []
    for p in pkg.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ClassDef):
                classes.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(root)}:{n.name}"))
    classes.sort(reverse=True)
    print("largest classes:", classes[:5], "over 350 lines:", sum(n > 350 for n, _ in classes))
    graph = import_graph(root, "ponderlm")
    print("import cycles:", find_cycles(graph))
    up = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if layer(b) > layer(a) and a != "ponderlm")
    print(f"imports running up the layering: {len(up)} {up}")


def functions(root: Path) -> None:
    pkg = root / "ponderlm"
    rows = []
    for p in pkg.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(root)}:{n.lineno} {n.name}"))
    rows.sort(reverse=True)
    print("longest functions:", rows[:5])
    print("functions over 50 lines:", sum(1 for r in rows if r[0] > 50))
    cmd = ["ruff", "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=1", "--output-format",
           "concise", "--no-cache", str(pkg)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    cx = sorted(((int(m[2]), m[1]) for m in re.finditer(r"`(\w+)` is too complex \((\d+) > 1\)", out)), reverse=True)
    print("worst complexity:", cx[:5])
    print("functions over complexity 12:", sum(1 for c in cx if c[0] > 12))
    pattern = re.compile(r'\.method\s*(==|!=)|\["method"\]\s*(==|!=)')
    hits = [f"{p}:{i}" for p in pkg.rglob("*.py") if p.name != "config.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    print("method-name comparisons outside config.py:", len(hits), hits[:5])


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    shape(root)
    functions(root)


if __name__ == "__main__":
    main()
