"""The README's Python example runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_readme_python_blocks_run(tmp_path):
    """Every ```python block runs as written; the transformers one (which loads `runs/p3_hf`) runs
    in a new interpreter, in a directory where `ponderlm export` has written a tiny trained
    PonderLM-3, as the README's commands would, and prints each prompt's completion and depths."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "README has lost a python example"
    for code in blocks:
        if "runs/p3_hf" in code:
            # a fresh interpreter, as a user runs it: the block has no `import ponderlm`, so the Auto
            # classes must know the model type from the installed package's .pth hook alone
            _export_like_the_readme(tmp_path)
            r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr[-3000:]
            out = r.stdout.splitlines()
            assert [ln.split(" -> ")[0] for ln in out[::2]] == ["'The king'", "'To be or not'"], out
            for line in out[1::2]:  # 20 depths, each a whole number of steps in 0..K
                depths = eval(line.split("depths:")[1])
                assert len(depths) == 20 and all(d in (0, 1, 2) for d in depths), line
            continue
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert "model" in namespace


def _export_like_the_readme(root: Path) -> None:
    import pytest

    pytest.importorskip("transformers")
    from errorcases import build_world, run_cli

    w = build_world(root / "world")
    r = run_cli(["export", str(w.run), "runs/p3_hf", "--tau", "0.05"], root)
    assert r.returncode == 0, r.stderr


def test_never_do_promises_point_at_existing_tests():
    """Each promise of "What ponderlm will never do" names tests (`tests/FILE.py::NAME`, then further
    names of the same file); every one of them exists: a test function or an error case id (`*`
    is a wildcard)."""
    import fnmatch
    import importlib

    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    section = text.split("## What ponderlm will never do", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for item in section.split("\n- ")[1:]:
        refs = re.findall(r"`(tests/\w+\.py)::([\w*]+)`|`([\w*]+)`", item)
        assert any(r[0] for r in refs), f"a promise without a test: {item[:80]}"
        module = None
        for file, name, bare in refs:
            if file:
                module = file
            name = name or bare
            if module is None or not re.fullmatch(r"[a-z_*0-9]+", name) or "_" not in name:
                continue  # an option or a file name in the prose, not a test reference
            mod = importlib.import_module(Path(module).stem)
            names = {n for n in dir(mod) if n.startswith("test_")} | {c.id for c in getattr(mod, "CASES", [])}
            found = fnmatch.filter(names, name)
            assert found, f"{module}::{name} does not exist"
            checked += 1
    assert checked >= 15
