"""The ``ponderlm`` command's layout: one module per verb group under ponderlm/cli/, each verb's
handler in its group's module, ``ponderlm --help`` listing the verbs in their fixed order, and
``python -m ponderlm`` running the same ``main`` as the ``ponderlm`` script."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ponderlm.cli.main import build_parser

VERBS = ("data", "train", "quickstart", "eval", "lm-eval-tasks", "lm-eval", "experiment", "analyze", "export",
         "convert", "generate", "serve", "demo")  # fmt: skip
GROUP = {"data prepare": "data", "data synthetic": "data", "train": "train", "quickstart": "train",
         "experiment pareto": "train", "experiment train": "train", "demo": "train", "eval": "eval",
         "analyze": "eval", "lm-eval-tasks": "eval", "lm-eval": "eval", "export": "hf", "convert": "hf",
         "generate": "generate", "serve": "serve"}  # fmt: skip


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, p in action.choices.items():
            yield from _leaves(p, (*path, name))


def test_each_verb_is_handled_in_its_group_module():
    found = {name: p.get_default("handler").__module__ for name, p in _leaves(build_parser())}
    assert found == {name: f"ponderlm.cli.{group}" for name, group in GROUP.items()}


def test_no_cli_module_is_long():
    for path in (Path(__file__).parents[1] / "ponderlm" / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path


def test_python_m_ponderlm_lists_the_verbs_in_order(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ponderlm", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "{" + ",".join(VERBS) + "}" in r.stdout.replace("\n", "").replace(" ", "")
    r = subprocess.run([sys.executable, "-m", "ponderlm", "serve", "--port", "x", "--checkpoint", "c"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert (r.returncode, r.stderr) == (2, "error: argument --port: must be a port number in [0, 65535], got x "
                                           "(see `ponderlm serve --help`)\n")  # fmt: skip
