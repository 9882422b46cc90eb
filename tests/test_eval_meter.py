"""Long scoring steps say how far they are: done/total, the rate and an ETA that is the work left at
that rate (ponderlm.eval.meter), fed by the scoring loops of perplexity, zero-shot tasks and analyze."""

from __future__ import annotations

import random
import time

import pytest
import torch

from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval.analyze import collect
from ponderlm.eval.meter import Meter
from ponderlm.eval.perplexity import perplexity
from ponderlm.eval.zeroshot import loglikelihoods

from conftest import tiny_model
from fakepkgs import WORDS, paragraph


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return Tokenizer.train_bpe([paragraph(rng, 20) for _ in range(50)] + [" ".join(WORDS)], vocab_size=300)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_meter_line_shows_done_total_rate_and_the_eta_of_that_rate():
    t = FakeClock()
    m = Meter("analyze: scoring 64 windows", "windows", clock=t, total=64)
    assert m.line() == "analyze: scoring 64 windows: 0/64 windows (0%), ? windows/s, ETA ? (0:00 so far)"
    t.t += 10.0
    m.update(16)
    assert m.line() == "analyze: scoring 64 windows: 16/64 windows (25%), 1.6 windows/s, ETA 0:30 (0:10 so far)"
    t.t += 5.0
    m.update(1200, 4800)  # a total given with the work (zero-shot scoring counts input tokens)
    assert m.line().startswith("analyze: scoring 64 windows: 1,200/4,800 windows (25%), 80 windows/s, ETA 0:45")


def test_meter_speaks_every_few_seconds_only_while_a_long_step_runs():
    said: list[str] = []
    with Meter("tau=0.1 val: scoring 4 windows", "windows", said.append, total=4, every=0.05) as m:
        for i in range(1, 5):
            time.sleep(0.04)
            m(i, 4)
    assert len(said) >= 2 and all(s.startswith("tau=0.1 val: scoring 4 windows: ") and "ETA" in s for s in said)
    said.clear()
    with Meter("quick", "windows", said.append, total=1, every=5) as m:
        m(1, 1)
    assert said == []


def test_the_scoring_loops_report_their_progress():
    model = tiny_model("ponderlm3")
    windows = torch.randint(0, 61, (5, 9))
    seen: list[tuple[int, int]] = []
    perplexity(model, windows, tau=0.3, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    seen.clear()
    collect(model, windows, 0.3, batch_size=3, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(3, 5), (5, 5)]


def test_zero_shot_scoring_reports_input_tokens(tok):
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=64)
    pairs = [("the state of", " the world"), ("people", " said"), ("a long context of the people", " of")]
    seen: list[tuple[int, int]] = []
    loglikelihoods(model, tok, pairs, tau=0.3, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert len(seen) == 2 and seen[0][0] < seen[1][0] == seen[1][1] == seen[0][1]
