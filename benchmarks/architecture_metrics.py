"""Architecture metrics of the package (issue 14): the longest functions (lines, by ``ast``), the
worst cyclomatic complexity (ruff's C901 at threshold 1) and method-name comparisons outside
``config.py``.

    python benchmarks/architecture_metrics.py            # this checkout
    python benchmarks/architecture_metrics.py OTHER_TREE # e.g. a git worktree of an older commit
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
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


if __name__ == "__main__":
    main()
