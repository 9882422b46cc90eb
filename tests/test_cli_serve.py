"""``ponderlm serve`` ends as every command does: Ctrl-C (SIGINT) is exit status 130, after the same
clean shutdown as SIGTERM (which is 0: tests/test_serve.py). Run the way users run it: a real
server process on 127.0.0.1 serving a tiny checkpoint made here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from errorcases import TINY, answer_ctrl_c  # noqa: E402
from fakepkgs import build_fake_dataset  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny PonderLM-3 (context 64) trained two steps."""
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    root = tmp_path_factory.mktemp("cli_serve")
    ds = build_fake_dataset(root)
    cfg, explicit = load_run_config(None, [*TINY, "model.max_seq_len=64", f"train.data_dir={ds}",
                                           f"train.out_dir={root / 'run'}"])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    return root / "run"


def test_ctrl_c_stops_serve_with_status_130(run, tmp_path):
    cmd = [sys.executable, "-m", "ponderlm", "serve", "--checkpoint", str(run), "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=answer_ctrl_c)  # fmt: skip
    try:
        line = proc.stdout.readline()  # "serving NAME (...) on http://127.0.0.1:PORT" once ready
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        end = time.monotonic() + 60
        while httpx.get(f"{m.group(1)}/health").status_code != 200:
            assert time.monotonic() < end, "never healthy"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert status == 130, err
