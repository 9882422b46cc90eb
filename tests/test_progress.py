"""Progress that tells the truth: the rate a progress line shows follows the pace as it changes (on
a fake clock), the ETA on the same line is the work left at that very rate, and a step that shows
no progress of its own says every few seconds that it is still going. A line is redrawn in place
only on a terminal wide enough to show it (a 0-column pseudo-terminal gets plain lines), and a line
drawn in place is ended before the next message is printed."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from ponderlm.progress import Progress, Rate, clock, heartbeat, line_width, redraws

from errorcases import TINY, answer_ctrl_c


def test_rate_follows_a_change_of_pace():
    rate, t, done = Rate(window=30.0), 0.0, 0
    rate.add(t, done)
    for _ in range(60):  # 100 tokens/s for a minute
        t, done = t + 1.0, done + 100
        rate.add(t, done)
    assert rate.per_s == pytest.approx(100.0)
    for _ in range(10):  # the machine gets busy: 25 tokens/s
        t, done = t + 4.0, done + 100
        rate.add(t, done)
    assert rate.per_s == pytest.approx(25.0)  # 40 s at the new pace: all of the window
    assert rate.eta_s(1000) == pytest.approx(1000 / rate.per_s)  # the ETA is the shown rate's


def test_rate_is_unknown_before_two_samples():
    rate = Rate()
    assert rate.per_s is None and rate.eta_s(10) is None
    rate.add(5.0, 0)
    assert rate.per_s is None and clock(rate.eta_s(10)) == "?"


def test_clock():
    assert [clock(s) for s in (0, 59.4, 61, 3600 + 62)] == ["0:00", "0:59", "1:01", "1:01:02"]


def test_heartbeat_speaks_only_for_long_steps():
    said: list[str] = []
    with heartbeat("fetching x", said.append, every=0.05):
        time.sleep(0.18)
    assert len(said) >= 2 and all(s.startswith("fetching x: still working, ") for s in said)
    said.clear()
    with heartbeat("fetching x", said.append, every=5):
        pass
    assert said == []


def test_training_lines_show_an_eta_consistent_with_their_rate(tmp_path):
    """Each `step N/M ... R tok/s  eta m:ss` line: eta = tokens left / R (to the display's rounding)."""
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    from fakepkgs import build_fake_dataset

    ds = build_fake_dataset(tmp_path)
    over = [o for o in TINY if not o.startswith("train.max_steps")]
    cfg, explicit = load_run_config(None, [*over, "train.max_steps=8", "train.log_interval=1", f"train.data_dir={ds}",
                                           f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    lines: list[str] = []
    train(cfg, explicit, log=lambda s: lines.append(str(s)))
    pat = re.compile(r"step (\d+)/(\d+) .* ([\d,]+) tok/s  eta (\d+):(\d\d)$")
    found = [m for m in map(pat.search, lines) if m]
    assert len(found) == 8, lines
    per_step = cfg.train.batch_size * cfg.train.seq_len
    for m in found:
        step, total, rate = int(m[1]), int(m[2]), float(m[3].replace(",", ""))
        eta = int(m[4]) * 60 + int(m[5])
        assert abs(eta - (total - step) * per_step / rate) <= 0.5 + (total - step) * per_step / rate * 0.01, m[0]


# ------------------------------------------------------------------ terminals of every width
@contextlib.contextmanager
def terminal(columns: int):
    """A pseudo-terminal ``columns`` wide (0: as some pseudo-terminals and CI logs report): its
    master fd, and its slave side as a text stream."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    stream = open(slave, "w", encoding="utf-8")  # noqa: SIM115 -- closed below, with the master
    try:
        yield master, stream
    finally:
        stream.close()
        os.close(master)


def test_redraws_only_on_a_terminal_of_usable_width(tmp_path):
    for columns, width, redrawn in [(0, 0, False), (5, 5, False), (80, 80, True)]:
        with terminal(columns) as (_, tty):
            assert (line_width(tty), redraws(tty)) == (width, redrawn), columns
    with open(tmp_path / "log", "w") as f:
        assert (line_width(f), redraws(f)) == (0, False)  # a file (a log, a CI capture)
    assert not redraws(io.StringIO())  # no file descriptor at all


def test_a_data_build_on_a_zero_column_terminal_logs_plain_lines(monkeypatch):
    """Progress that would be drawn in place on stderr is logged instead where stderr is a terminal
    of 0 columns: there a redrawn line shows nothing."""
    now, said = [0.0], []
    with terminal(0) as (_, tty):
        monkeypatch.setattr(sys, "stderr", tty)
        p = Progress("tokenizing: read", 100, said.append, every=1.0, clock=lambda: now[0])
        assert not p.tty
        for done in (10, 20, 30):
            now[0] += 2.0
            p.update(done)
        p.close()
    assert [s.split(",")[0] for s in said] == [
        "tokenizing: read 10 B of 100 B (10%)",
        "tokenizing: read 20 B of 100 B (20%)",
        "tokenizing: read 30 B of 100 B (30%)",
        "tokenizing: read 30 B in 0:06 (5 B/s)",
    ]
    with terminal(80) as (_, tty):
        monkeypatch.setattr(sys, "stderr", tty)
        assert Progress("x", 100, said.append).tty  # a real terminal: drawn in place, as before


def _read_all(master: int, proc: subprocess.Popen, limit_s: float) -> str:
    """Everything a process writes to its terminal until it exits."""
    out, end = b"", time.monotonic() + limit_s
    while time.monotonic() < end:
        if select.select([master], [], [], 0.2)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the last writer closed its side
                break
            out += data
        elif proc.poll() is not None:
            break
    return out.decode(errors="replace")


def test_training_on_a_zero_column_terminal_shows_its_step_lines(tmp_path):
    """On a terminal of 0 columns tqdm draws nothing readable (a bar cut to nothing, never a line
    ended); the step lines must be printed instead, as they are where stderr is not a terminal."""
    from fakepkgs import build_fake_dataset

    ds = build_fake_dataset(tmp_path)
    over = [o for o in TINY if not o.startswith("train.progress")]
    cmd = [sys.executable, "-m", "ponderlm", "train", *over, "train.progress=true", "train.log_interval=1",
           f"train.data_dir={ds}", f"train.out_dir={tmp_path / 'run'}", "--threads", "1"]  # fmt: skip
    with terminal(0) as (master, tty):
        proc = subprocess.Popen(cmd, stdin=tty, stdout=tty, stderr=tty, cwd=tmp_path, preexec_fn=answer_ctrl_c)
        text = _read_all(master, proc, 240)
        assert proc.wait(timeout=60) == 0, text
    assert "step 2/2  loss" in text, text


def test_a_progress_line_is_ended_before_the_next_message(monkeypatch):
    """A line drawn in place, then a message: the message starts a line of its own, also when the
    Progress was not closed (a generator that returns once it has enough, as data prepare's BPE
    sample does), never `... ETA 0:01BPE trained on ...`."""
    term = io.StringIO()  # one terminal: stdout and stderr interleave on it
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    now = [0.0]

    def sample():
        p = Progress("BPE sample: read", 100, print, clock=lambda: now[0], tty=True)
        for done in range(10, 101, 10):
            now[0] += 1.0
            p.update(done)
            yield done
            if done == 50:
                return

    assert list(sample()) == [10, 20, 30, 40, 50]
    print("BPE trained on 50 characters")
    with Progress("tokenizing: read", 100, print, clock=lambda: now[0], tty=True) as p:
        now[0] += 1.0
        p.update(60)
    print("done")
    text = term.getvalue()
    assert "ETA 0:05\r\x1b[2KBPE trained on 50 characters\n" in text, repr(text)
    assert text.endswith("\r\x1b[2Ktokenizing: read 60 B in 0:01 (60 B/s)\ndone\n"), repr(text)
    assert not re.search(r"ETA [\d:?]+[^\d:?\r\n]", text), repr(text)  # nothing glued to a drawn line


def test_data_prepare_ends_its_bpe_sample_line(tmp_path, monkeypatch):
    """The real build, its progress drawn on a terminal: the BPE sample's line is ended before
    `BPE trained on ...` (it ran on into it)."""
    import ponderlm.progress as progress_mod
    from ponderlm.data import PrepareConfig, prepare

    from fakepkgs import WORDS

    ticks = [0.0]

    def tick() -> float:  # every look at the clock is a second later: every update is drawn
        ticks[0] += 1.0
        return ticks[0]

    init = progress_mod.Progress.__init__
    monkeypatch.setattr(progress_mod.Progress, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "tty": True, "clock": tick}))  # fmt: skip
    term = io.StringIO()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    text = "\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) + "." for i in range(300))
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(text.split("\n")))
    prepare(PrepareConfig(out_dir=tmp_path / "d", sources=(), inputs=[src], vocab_size=300, workers=1,
                          val_fraction=0.05), log=print)  # fmt: skip
    out = term.getvalue()
    assert "BPE sample: read" in out and "BPE trained on" in out, out
    assert "\r\x1b[2KBPE trained on" in out, repr(out)
    assert not re.search(r"ETA [\d:?]+[^\d:?\r\n]", out), repr(out)
