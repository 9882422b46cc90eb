"""Progress that tells the truth: the rate a progress line shows follows the pace as it changes (on
a fake clock), the ETA on the same line is the work left at that very rate, and a step that shows
no progress of its own says every few seconds that it is still going."""

from __future__ import annotations

import re
import time

import pytest

from ponderlm.progress import Rate, clock, heartbeat

from errorcases import TINY


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
    from ponderlm.config import load_run_config
    from ponderlm.train import train

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
