"""The harness behind every row of docs/ERRORS.md.

A :class:`Case` is one user mistake or fault: a command line (after ``ponderlm``), the stable part
of the one-line message it must print, and optionally a ``setup`` that builds the broken input in
the case's scratch directory first. :func:`check_case` runs it through the real command line -
in this process through ``ponderlm.cli.main.main`` (the function ``python -m ponderlm`` calls), or in
a subprocess where the case needs a real process (stdin bytes, a closed pipe, signals, a second
process) - and asserts:

- the exit status (2 for every user mistake);
- stderr is exactly one line, ``error: ...``, containing the message, and no traceback;
- stdout is empty (``data prepare`` may log progress there);
- nothing under the world or the scratch directory was created, changed or removed: no output
  directory, no temporary file, no lock file, existing outputs untouched.

Test modules ``tests/test_errors*.py`` each define ``CASES``; ``test_errors.py`` checks that the
table in docs/ERRORS.md lists exactly the cases of all of them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
    "train.seq_len=32", "train.batch_size=4", "train.max_steps=2", "train.eval_windows=4", "train.progress=false",
]  # fmt: skip
CASE_MODULES = ("test_errors", "test_errors_owned", "test_errors_data", "test_errors_cli", "test_synthetic",
                "test_errors_limits")  # fmt: skip


@dataclass
class Case:
    id: str
    args: Callable  # (w, scratch) -> argv after `ponderlm`
    message: str  # what stderr must contain (the stable part of the message)
    setup: Callable | None = None  # (w, scratch) -> None: build the broken input before the snapshot
    proc: bool = False  # run in a subprocess (stdin bytes, pipes, signals, a second process)
    stdin: bytes | None = None
    exit: int = 2
    cleanup: Callable | None = None  # (w, scratch) -> None: after the check, pass or fail (unmount, stop a holder)


def train_args(*extra: str) -> list[str]:
    return ["train", *TINY, *extra]


def build_world(root: Path) -> SimpleNamespace:
    """One dataset, one tiny trained run (context 32 tokens) and the broken inputs built from them."""
    from ponderlm.data import PrepareConfig, prepare
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    from fakepkgs import build_fake_dataset

    ds = build_fake_dataset(root)
    run = root / "run"
    cfg, explicit = load_run_config(None, [*TINY, "model.max_seq_len=32", f"train.data_dir={ds}",
                                           f"train.out_dir={run}"])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    ck = sorted((run / "checkpoints").iterdir())[-1]

    trunc = root / "trunc_run"  # a run whose only checkpoint has its weights cut in half
    shutil.copytree(run, trunc)
    weights = trunc / "checkpoints" / ck.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    nomf = root / "no_manifest"  # a checkpoint directory without its manifest
    shutil.copytree(ck, nomf)
    (nomf / "manifest.json").unlink()
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run\n")

    bad_ids = root / "bad_ids_ds"  # a dataset whose shards hold ids its tokenizer does not have
    shutil.copytree(ds, bad_ids)
    for shard in bad_ids.glob("*.bin"):
        np.full(shard.stat().st_size // 2, 1000, dtype=np.uint16).tofile(shard)
    refresh_checksums(bad_ids)  # the shards match meta.json: only their ids are wrong

    texts = root / "inputs"
    texts.mkdir()
    (texts / "empty.txt").write_text("")
    (texts / "empty.bin").write_bytes(b"")
    (texts / "tiny.txt").write_text("A corpus of one short sentence.\n")
    (texts / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    np.arange(0, 1000, dtype=np.uint16).tofile(texts / "foreign_ids.bin")
    tiny_ds = root / "tiny_ds"
    tiny_cfg = PrepareConfig(out_dir=tiny_ds, sources=(), inputs=[texts / "tiny.txt"], vocab_size=300)
    prepare(tiny_cfg, log=lambda *_: None)

    outs = root / "existing"  # outputs that already exist
    (outs / "eval").mkdir(parents=True)
    (outs / "eval" / "eval.md").write_text("an earlier evaluation\n")
    (outs / "export").mkdir()
    (outs / "export" / "keep.txt").write_text("keep\n")
    return SimpleNamespace(root=root, ds=ds, run=run, ck=ck, trunc=trunc, nomf=nomf, foreign=foreign,
                           bad_ids=bad_ids, texts=texts, tiny_ds=tiny_ds, outs=outs)  # fmt: skip


def try_mount_tmpfs(path: Path, options: str) -> None:
    """Mount a tmpfs at ``path`` (e.g. ``size=64k`` for a disk that fills, ``ro`` for a read-only
    one), or skip the test when this machine does not let the tests mount (not root)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding ponderlm's lock on ``directory`` until it is killed."""
    import time

    code = ("import sys, time; from ponderlm.owned import DirLock; "
            "l = DirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    time.sleep(0.05)
    return p


def refresh_checksums(data_dir: Path) -> None:
    """Rewrite meta.json's shard checksums after a test edited shards on purpose."""
    import hashlib
    import json

    meta = json.loads((data_dir / "meta.json").read_text())
    for split in meta["splits"].values():
        for sh in split["shards"]:
            sh["sha256"] = hashlib.sha256((data_dir / sh["file"]).read_bytes()).hexdigest()
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file, directory and link under the roots, with sizes, modification times and content
    hashes of small files (a same-size rewrite is a change too)."""
    import hashlib

    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 22 else ""
                out[str(p)] = (st.st_size, st.st_mtime_ns, digest)
            else:
                out[str(p)] = ("dir", st.st_mode)
    return out


def run_cli(argv: list[str], cwd: Path, *, proc: bool = False, stdin: bytes | None = None,
            env: dict | None = None, timeout: float = 180) -> SimpleNamespace:  # fmt: skip
    """Run ``ponderlm ARGV``; returns returncode, stdout, stderr (text)."""
    if proc or stdin is not None or env is not None:
        r = subprocess.run([sys.executable, "-m", "ponderlm", *argv], capture_output=True, cwd=cwd, timeout=timeout,
                           input=stdin if stdin is not None else b"", env={**os.environ, **(env or {})})  # fmt: skip
        return SimpleNamespace(returncode=r.returncode, stdout=r.stdout.decode(errors="replace"),
                               stderr=r.stderr.decode(errors="replace"))  # fmt: skip
    from ponderlm.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def check_case(case: Case, w, tmp_path: Path) -> SimpleNamespace:
    """Run a case and check it (see the module docstring); returns the command's result."""
    scratch = tmp_path / "scratch"  # the command's working directory and where new outputs would go
    scratch.mkdir()
    try:
        if case.setup is not None:
            case.setup(w, scratch)
        return _check(case, w, scratch)
    finally:
        if case.cleanup is not None:
            case.cleanup(w, scratch)


def _check(case: Case, w, scratch: Path) -> SimpleNamespace:
    argv = case.args(w, scratch)
    before = snapshot(w.root, scratch)
    r = run_cli(argv, scratch, proc=case.proc, stdin=case.stdin)
    assert r.returncode == case.exit, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert case.message in lines[0], lines[0]
    if argv[0] != "data":  # `data prepare` logs its progress on stdout; nothing else prints
        assert r.stdout == "", r.stdout[-500:]
    assert snapshot(w.root, scratch) == before  # nothing created (no temporaries either), changed or removed
    return r


def answer_ctrl_c() -> None:
    """In a child about to exec: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt even when the tests themselves run with SIGINT ignored (as a shell does for
    a command started in the background with `&`, which the child would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
