"""No inference path builds an autograd graph, and the zero-shot scorer runs the output head only
where it scores (issue 30: with autograd on, `ponderlm eval` kept each batch's graph alive and
went past 24 GB on SmolLM2-135M).

Every module of the model gets a forward hook that records whether the call ran with grad mode on
or returned a tensor that requires grad; each path runs under ``torch.enable_grad()``, so a path
that does not turn autograd off itself is caught, whatever the caller's mode."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval import head
from ponderlm.eval.analyze import _text_tokens, collect
from ponderlm.eval.perplexity import perplexity
from ponderlm.eval.tasks import Doc
from ponderlm.eval.zeroshot import encode_pair, loglikelihoods, score_task
from ponderlm.model.generate import generate
from ponderlm.serving.engine import engine_scheduler
from ponderlm.serving.scheduler import BatchSettings, Request

from conftest import tiny_model
from fakepkgs import WORDS, paragraph

PAIRS = [("the state of", " the world"), ("one", " two three four five six"), ("of the people", " and"),
         ("the world is", " good and the state of the people")]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return Tokenizer.train_bpe([paragraph(rng, 20) for _ in range(50)] + [" ".join(WORDS)], vocab_size=300)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


class GradWatch:
    """Forward hooks on every module: ``calls`` module calls seen, ``graphs`` the names of those
    that ran with grad mode on or returned a tensor requiring grad."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls, self.graphs = 0, []
        self.handles = [m.register_forward_hook(self._hook(name or "model")) for name, m in model.named_modules()]

    def _hook(self, name: str):
        def hook(module, args, out):
            self.calls += 1
            if torch.is_grad_enabled() or any(t.requires_grad for t in _tensors(out)):
                self.graphs.append(name)

        return hook

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def check(self) -> None:
        assert self.calls > 0, "the path never ran the model"
        assert not self.graphs, f"autograd recorded in {len(self.graphs)} module calls, e.g. {self.graphs[:3]}"


def _run(model, fn):
    """fn() with grad mode on, watched; fails if any module call recorded a graph."""
    with GradWatch(model) as w, torch.enable_grad():
        out = fn()
    w.check()
    return out


def test_the_watch_sees_a_graph():
    """The guard itself: a plain forward with grad on is caught, the same under no_grad is not."""
    model = tiny_model("ponderlm3", dtype=torch.float32)
    x = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with GradWatch(model) as w, torch.enable_grad():
        model(x, mode="hard", tau=0.3)
    assert w.calls > 0 and "lm_head" in w.graphs
    with GradWatch(model) as w, torch.no_grad():
        model(x, mode="hard", tau=0.3)
    w.check()


@pytest.mark.parametrize("method", ["vanilla", "loop", "ponderlm2", "ponderlm3"])
def test_zeroshot_scoring_builds_no_graph(tok, method):
    model = tiny_model(method, vocab_size=320, max_seq_len=64, dtype=torch.float32)
    scored, _ = _run(model, lambda: loglikelihoods(model, tok, PAIRS, tau=0.3, batch_size=2))
    assert len(scored) == len(PAIRS) and all(math.isfinite(s.loglik) and s.loglik < 0 for s in scored)
    docs = [Doc("piqa", 0, ("the state of",) * 2, (" the world", " one"), 1, ("the world", "one"))]
    assert _run(model, lambda: score_task(model, tok, docs, tau=0.3))["n"] == 1


def test_zeroshot_runs_the_head_only_on_continuation_tokens(tok):
    """The head sees one row per continuation token, never the (B, T, vocab) of a batch."""
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=64, dtype=torch.float32)
    rows = []
    h = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    try:
        loglikelihoods(model, tok, PAIRS, tau=0.3, batch_size=3)
    finally:
        h.remove()
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)  # one (positions, D) call per batch
    assert sum(r[0] for r in rows) == sum(len(encode_pair(tok, c, x)[1]) for c, x in PAIRS)


@pytest.mark.parametrize(
    "method,mode",
    [("ponderlm3", "hard"), ("ponderlm3", "exact"), ("ponderlm3", "soft"), ("ponderlm2", "hard"), ("loop", "hard"),
     ("vanilla", "hard")],
)  # fmt: skip
def test_zeroshot_scores_equal_full_logits(tok, method, mode, monkeypatch):
    """Scoring at the continuation positions only, in chunks of any size, gives the scores of
    the full (B, T, vocab) log-softmax of an unpadded forward (the scorer before the change)."""
    model = tiny_model(method, vocab_size=320, max_seq_len=64)  # float64: differences are the method's, not rounding
    got, _ = loglikelihoods(model, tok, PAIRS, tau=0.3, mode=mode, batch_size=3)
    monkeypatch.setattr(head, "MAX_ELEMENTS", 1)  # one row of logits at a time
    one_row, _ = loglikelihoods(model, tok, PAIRS, tau=0.3, mode=mode, batch_size=3)
    for (c, x), s, s1 in zip(PAIRS, got, one_row, strict=True):
        ctx, cont = encode_pair(tok, c, x)
        with torch.no_grad():
            out = model(torch.tensor([ctx + cont])[:, :-1], mode=mode, **({} if mode == "soft" else {"tau": 0.3}))
        lp = out.logits.log_softmax(-1)[0, -len(cont) :]
        want = float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert abs(s.loglik - want) < 1e-9 and abs(s1.loglik - want) < 1e-9
        assert s.greedy == s1.greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())


class _Wrapped(torch.nn.Module):
    """Stands for a DDP/compiled module: not a PonderLM, so score_batch takes the logits of its forward."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_perplexity_in_head_chunks_equals_full_logits(monkeypatch, mode):
    """A bare model's perplexity comes from the head a chunk at a time; a wrapped one's from the
    full logits of its forward, as before. The two agree, per class too."""
    from ponderlm.eval.perplexity import score_batch, score_batch_by_class

    model = tiny_model("ponderlm3", dtype=torch.float32)
    w = torch.randint(0, model.cfg.vocab_size, (3, 10))
    labels = torch.randint(0, 3, (3, 9))
    kw = {"mode": mode, **({"tau": 0.3} if mode != "soft" else {})}
    full = score_batch(_Wrapped(model), model.cfg, w[:, :-1], w[:, 1:], **kw)
    full_c = score_batch_by_class(_Wrapped(model), model.cfg, w[:, :-1], w[:, 1:], labels, 3, **kw)
    monkeypatch.setattr(head, "MAX_ELEMENTS", 2 * model.cfg.vocab_size)  # two positions of logits at a time
    rows = []
    h = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        chunked = score_batch(model, model.cfg, w[:, :-1], w[:, 1:], **kw)
        chunked_c = score_batch_by_class(model, model.cfg, w[:, :-1], w[:, 1:], labels, 3, **kw)
    finally:
        h.remove()
    assert rows and max(rows) == 2 and sum(rows) == 2 * w[:, 1:].numel()
    assert torch.allclose(chunked, full, rtol=1e-6, atol=0)
    for a, b in zip(chunked_c, full_c, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


def test_perplexity_and_analyze_build_no_graph():
    model = tiny_model("ponderlm3", dtype=torch.float32)
    windows = torch.randint(0, model.cfg.vocab_size, (3, 9))
    hard = _run(model, lambda: perplexity(model, windows, tau=0.3, batch_size=2))
    exact = _run(model, lambda: perplexity(model, windows, mode="exact", tau=0.3))
    assert hard and exact  # each path ran and reported (GradWatch.check: without a graph)
    assert _run(model, lambda: collect(model, windows, 0.3, batch_size=2)) is not None


def test_analyze_text_builds_no_graph(tok):
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=64, dtype=torch.float32)
    toks = _run(model, lambda: _text_tokens(model, tok, tok.encode("the state of the world"), 0.3))
    assert toks[-1]["loss"] is None and all(t["loss"] is not None for t in toks[:-1])


@pytest.mark.parametrize("method", ["vanilla", "loop", "ponderlm3"])
def test_generate_builds_no_graph(method):
    model = tiny_model(method, dtype=torch.float32)
    x = torch.randint(1, model.cfg.vocab_size, (2, 6))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :2] = False
    for kw in ({}, {"prefill": "exact"}, {"schedule": "token", "temperature": 0.8, "seed": 0}):
        out = _run(model, lambda kw=kw: model.generate(x, 4, attention_mask=mask, tau=0.3, **kw))
        assert out is not None
    assert _run(model, lambda: generate(model, x[:1], 3, tau=0.3, on_token=lambda t, d: None)) is not None


def drain(sched, steps: int = 200) -> None:
    """Step an engine scheduler until it has nothing left (as the engine's loop does)."""
    for _ in range(steps):
        if not sched.safe_step() and sched.queue.empty():
            return
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("prefill", ["auto", "exact"])
def test_the_engine_scheduler_builds_no_graph(prefill):
    """The server's engine steps this scheduler (engine.engine_scheduler, then safe_step)."""
    model = tiny_model("ponderlm3", dtype=torch.float32)
    sched = engine_scheduler(model, None, BatchSettings(max_batch=3, tau=0.3, prefill=prefill, walk_max=2))
    for i, n in enumerate([1, 7, 12, 4]):  # some walk their prompt, some are prefilled together
        sched.submit(Request(list(range(1 + i, 1 + i + n)), 3, temperature=0.7 * (i % 2), seed=i))

    _run(model, lambda: drain(sched))
    assert sched.stats.admitted == 4


def test_lm_eval_adapter_builds_no_graph(tmp_path, tok):
    pytest.importorskip("lm_eval")
    from ponderlm.eval.lm_eval_adapter import PonderLMEval
    from ponderlm.runs.checkpoint import save_checkpoint
    from ponderlm.runs.config import RunConfig

    tok.save(tmp_path / "tokenizer.json")
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=64, dtype=torch.float32)
    ck = save_checkpoint(tmp_path / "run", 0, model.state_dict(), None, {"step": 0}, RunConfig(model=model.cfg),
                         tmp_path / "tokenizer.json", keep_last=1)  # fmt: skip
    lm = PonderLMEval(checkpoint=str(ck), tau=0.3)

    class Req:
        def __init__(self, *args):
            self.args = args

    got = _run(lm.model, lambda: lm.loglikelihood([Req(c, x) for c, x in PAIRS]))
    assert len(got) == len(PAIRS)
    text = "the state of the world is good " * 12  # longer than the context: several windows
    _run(lm.model, lambda: lm.loglikelihood_rolling([Req(text)]))
    _run(lm.model, lambda: lm.generate_until([Req("the state of", {"until": ["\n"], "max_gen_toks": 4})]))
