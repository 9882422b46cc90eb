"""The serving step's cheaper paths (issue 32, item 6) compute what they replaced: the scheduler's
mixing of rows grouped by depth equals :func:`recurrence.mix_slots`; prompts scored (``echo`` with
``logprobs``) on the scorer's thread give :func:`score_prompt`'s numbers exactly while other rows
keep decoding; the engine's compact token events arrive as the same :class:`Token` objects. No
timed assertions: "keeps decoding" is shown by a scoring pass that cannot finish until another
stream has produced tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from ponderlm.model import recurrence
from ponderlm.serving import scoring as scoring_mod
from ponderlm.serving.scheduler import BatchSettings, Finished, Request, Scheduler, Token
from ponderlm.serving.scoring import PromptScores, score_prompt

from conftest import tiny_model

TAU = 0.4


class Collect:
    def __init__(self, on_token=None) -> None:
        self.events: list = []
        self.on_token = on_token

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, Token) and self.on_token is not None:
            self.on_token()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if isinstance(e, Token)]

    @property
    def depths(self) -> list[int]:
        return [e.depth for e in self.events if isinstance(e, Token)]

    @property
    def end(self) -> Finished | None:
        return self.events[-1] if self.events and isinstance(self.events[-1], Finished) else None


def _generate(model, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    out = model.generate(torch.tensor([prompt]), n, tau=TAU, schedule="token")
    return out.tokens[0, len(prompt) :].tolist(), out.depth[0].tolist()


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3", "vanilla"])
def test_mixing_by_depth_groups_equals_mix_slots(method):
    """recurrence.mix_slots_by_depth on rows of one depth is mix_slots with width d+1; a step's rows
    of every depth, sorted as Scheduler._sample takes them, give what each depth's mix_slots gives."""
    model = tiny_model(method, dtype=torch.float64)
    B, K = 6, model.cfg.n_latent
    st = recurrence.new_slot_state(model, B, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(0)
    st.hs = torch.randn(B, K + 1, model.cfg.d_model, generator=g, dtype=torch.float64)
    st.probs = torch.rand(B, K + 1, generator=g, dtype=torch.float64).softmax(-1)
    if model.router is not None:
        st.depth = torch.tensor([0, 1, 2, 3, 1, 0][:B]).clamp(max=K)
    with torch.inference_mode():
        for d in sorted(set(st.depth.tolist())):
            rows = [i for i, x in enumerate(st.depth.tolist()) if x == d]
            want = recurrence.mix_slots(model, st, torch.tensor(rows), d + 1)
            assert torch.equal(recurrence.mix_slots_by_depth(model, st, rows, [d] * len(rows)), want), d
        # as _sample takes them: every row in order of depth, each depth a slice of the result
        depths = st.depth.tolist()
        order = sorted(range(B), key=depths.__getitem__)
        got_all = recurrence.mix_slots_by_depth(model, st, order, [depths[i] for i in order])
        at = torch.tensor(order)
        a = 0
        for d in sorted(set(depths)):
            n = depths.count(d)
            want = recurrence.mix_slots(model, st, at[a : a + n], d + 1)
            assert torch.equal(got_all[a : a + n], want), d
            a += n


def _drive(sched: Scheduler, until, steps: int = 5000) -> None:
    for _ in range(steps):
        sched.step()
        if until():
            return
    raise AssertionError("the scheduler did not get there")


def test_a_long_scoring_request_does_not_stall_another_stream(monkeypatch):
    """While one prompt is scored, a decoding stream keeps producing tokens: the scoring pass here
    waits until the stream has produced 5 more tokens, which it could never see if scoring ran inside
    a step. Its scores are score_prompt's, bit for bit, and the stream's tokens are generate's."""
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=4, tau=TAU))
    counted = {"n": 0}
    seen = threading.Event()
    started = threading.Event()
    mark = {"at": None}

    def on_token() -> None:
        counted["n"] += 1
        if mark["at"] is not None and counted["n"] >= mark["at"] + 5:
            seen.set()

    stream = Collect(on_token)
    sched.submit(Request([3, 4, 5], 60, ignore_eos=True, on_event=stream))
    _drive(sched, lambda: counted["n"] >= 2)

    inner = scoring_mod.score_prompt
    waited = {}

    def slow_score(m, prompt, tau, k):
        mark["at"] = counted["n"]
        started.set()
        waited["ok"] = seen.wait(timeout=30)  # the stream must move while this pass runs
        return inner(m, prompt, tau, k)

    monkeypatch.setattr(scoring_mod, "score_prompt", slow_score)
    long_prompt = [(7 * i) % (model.cfg.vocab_size - 1) + 1 for i in range(40)]
    scored = Collect()
    sched.submit(Request(long_prompt, 0, logprobs=2, score_prompt=True, on_event=scored))
    _drive(sched, lambda: scored.end is not None)
    assert started.is_set() and waited["ok"], "the stream produced no tokens while the prompt was scored"
    assert stream.end is None  # still decoding when the scores came back
    want, want_flops = inner(model, long_prompt, TAU, 2)
    got = scored.events[0]
    assert isinstance(got, PromptScores) and (got.logprobs, got.top) == (want.logprobs, want.top)
    assert scored.end.reason == "length" and scored.end.flops == want_flops == scored.end.prompt_flops
    _drive(sched, lambda: stream.end is not None)
    assert (stream.tokens, stream.depths) == _generate(model, [3, 4, 5], 60)


@pytest.mark.parametrize("prefill", ["auto", "converged"])
def test_a_scored_request_then_generates_as_generate(prefill):
    """echo + logprobs with tokens to generate: the prompt's scores first (score_prompt's), then the
    tokens generate gives, and the scoring FLOPs in its Finished, beside a plain request."""
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=2, tau=TAU, prefill=prefill))
    a, b = Collect(), Collect()
    sched.submit(Request([5, 6, 7, 8], 6, logprobs=1, score_prompt=True, on_event=a))
    sched.submit(Request([9, 10], 6, on_event=b))
    _drive(sched, lambda: a.end is not None and b.end is not None)
    want, flops = score_prompt(model, [5, 6, 7, 8], TAU, 1)
    first = a.events[0]
    assert isinstance(first, PromptScores) and (first.logprobs, first.top) == (want.logprobs, want.top)
    how = "exact" if prefill == "auto" else prefill
    ref = model.generate(torch.tensor([[5, 6, 7, 8]]), 6, tau=TAU, schedule="token", prefill=how)
    assert (a.tokens, a.depths) == (ref.tokens[0, 4:].tolist(), ref.depth[0].tolist())
    assert a.end.reason == "length" and a.end.prompt_flops > flops > 0
    ref = model.generate(torch.tensor([[9, 10]]), 6, tau=TAU, schedule="token", prefill=how)
    assert (b.tokens, b.depths) == (ref.tokens[0, 2:].tolist(), ref.depth[0].tolist())
    assert sched.rows == [] and sched.cache is None and not sched._scorer.pending


def test_cancel_and_stop_while_scoring(monkeypatch):
    """A request cancelled while its prompt is scored ends cancelled, without scores; stop() ends
    the one still being scored cancelled too."""
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=4, tau=TAU))
    p1, p2 = [3, 4, 5], [6, 7, 8]
    release = {tuple(p1): threading.Event(), tuple(p2): threading.Event()}
    started = {tuple(p1): threading.Event(), tuple(p2): threading.Event()}
    inner = scoring_mod.score_prompt

    def held(m, prompt, tau, k):
        started[tuple(prompt)].set()
        release[tuple(prompt)].wait(timeout=60)
        return inner(m, prompt, tau, k)

    monkeypatch.setattr(scoring_mod, "score_prompt", held)
    first, second = Collect(), Collect()
    r1 = Request(p1, 4, logprobs=0, score_prompt=True, on_event=first)
    sched.submit(r1)
    sched.submit(Request(p2, 4, logprobs=0, score_prompt=True, on_event=second))
    _drive(sched, started[tuple(p1)].is_set)
    r1.cancel()
    release[tuple(p1)].set()
    _drive(sched, lambda: first.end is not None)
    assert [type(e) for e in first.events] == [Finished] and first.end.reason == "cancelled"
    _drive(sched, started[tuple(p2)].is_set)  # the second prompt is being scored now
    sched.stop()
    release[tuple(p2)].set()
    assert [type(e) for e in second.events] == [Finished] and second.end.reason == "cancelled"


def test_a_bad_id_in_a_scored_prompt_fails_that_request_only(capsys):
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=2, tau=TAU))
    bad, good = Collect(), Collect()
    sched.submit(Request([3, model.cfg.vocab_size + 5], 2, logprobs=0, score_prompt=True, on_event=bad))
    sched.submit(Request([3, 4], 3, on_event=good))
    _drive(sched, lambda: bad.end is not None and good.end is not None)
    assert bad.end.reason == "error" and not any(isinstance(e, PromptScores) for e in bad.events)
    assert (good.tokens, good.depths) == _generate(model, [3, 4], 3)


def test_engine_tokens_travel_as_tuples_and_arrive_as_tokens():
    """The engine packs a token without logprobs as (token, depth); the server's side unpacks it
    into the Token the scheduler emitted. Tokens with logprobs and the other events travel as they are."""
    from ponderlm.serving.engine import Engine, _EngineLoop, engine_scheduler

    model = tiny_model("ponderlm3", dtype=torch.float64)
    sent = []

    class Pipe:
        def send(self, msg):
            sent.append(msg)

    loop = _EngineLoop(Pipe(), engine_scheduler(model, None, BatchSettings(max_batch=2, tau=TAU)))
    loop.handle(("add", 0, [3, 4], 3, 0.0, None, None, True, None, False))
    loop.handle(("add", 1, [5, 6], 2, 0.0, None, None, True, 2, True))
    direct = {0: Collect(), 1: Collect()}
    ref = Scheduler(model, None, BatchSettings(max_batch=2, tau=TAU))
    ref.submit(Request([3, 4], 3, ignore_eos=True, on_event=direct[0]))
    ref.submit(Request([5, 6], 2, ignore_eos=True, logprobs=2, score_prompt=True, on_event=direct[1]))
    while loop.sched.safe_step() or not loop.sched.queue.empty():
        loop.report(False)
    loop.report()
    _drive(ref, lambda: all(c.end is not None for c in direct.values()))
    packed = [ev for _, events, _ in sent for _, ev in events]
    assert any(type(ev) is tuple for ev in packed)
    assert not any(type(ev) is Token and ev.logprob is None for ev in packed)

    engine = Engine("unused", "cpu", BatchSettings(max_batch=2))
    try:
        got = {0: Collect(), 1: Collect()}
        for rid, c in got.items():
            engine.reqs[rid] = Request([], 0, on_event=c)
        for msg in sent:
            engine._take(msg)
        for rid in (0, 1):
            assert got[rid].events == direct[rid].events, rid
        assert all(type(e) in (Token, PromptScores, Finished) for c in got.values() for e in c.events)
    finally:
        engine.conn.close()
        engine._child.close()
