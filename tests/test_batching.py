"""Continuous batching (ponderlm.serving.scheduler) driven step by step, and the cache rows it adds and
frees: a request's greedy tokens equal ``generate`` on its prompt alone, whatever joins or leaves
the batch around it, and a batch that empties holds no cache."""

from __future__ import annotations

import pytest
import torch

from ponderlm.model.cache import KVCache
from ponderlm.serving.scheduler import BatchSettings, Finished, QueueFull, Request, Scheduler, Token

from conftest import tiny_model

SLOT_METHODS = ["vanilla", "pause", "ponderlm2", "ponderlm3"]


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


class Collect:
    """A request's events, as the server's queue would receive them."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.depths: list[int] = []
        self.end: Finished | None = None

    def __call__(self, ev) -> None:
        if isinstance(ev, Token):
            self.tokens.append(ev.token)
            self.depths.append(ev.depth)
        else:
            self.end = ev


def _reference(model, prompt: list[int], n: int, eos: int | None, tau: float) -> tuple[list[int], list[int]]:
    """What `ponderlm generate` computes for one prompt (token schedule, default prefill)."""
    out = model.generate(torch.tensor([prompt]), n, eos_token_id=eos, tau=tau, schedule="token")
    toks, deps = out.tokens[0, len(prompt) :].tolist(), out.depth[0].tolist()
    if eos is not None and eos in toks:
        k = toks.index(eos)
        toks, deps = toks[:k], deps[:k]
    return toks, deps


@pytest.mark.parametrize("method", SLOT_METHODS)
def test_interleaved_arrivals_equal_generate_alone(method):
    """Requests arrive at different steps, with different lengths, into a batch smaller than
    their number (so some wait in the queue); each one's tokens and depths are generate's."""
    model = tiny_model(method, dtype=torch.float64)
    tau, eos = 0.4, 7
    sched = Scheduler(model, eos, BatchSettings(max_batch=3, max_queue=16, tau=tau))
    prompts = _prompts(7, model.cfg.vocab_size)
    lengths = [5, 12, 1, 9, 3, 15, 6]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4, 5], 9: [6]}  # step -> requests submitted before it
    got = [Collect() for _ in prompts]
    for step in range(400):
        for i in arrivals.get(step, []):
            sched.submit(Request(prompts[i], lengths[i], on_event=got[i]))
        if not sched.step() and step > max(arrivals) and sched.queue.empty():
            break
    assert sched.rows == [] and sched.cache is None and sched.stats.cache_entries == 0
    for i, p in enumerate(prompts):
        toks, deps = _reference(model, p, lengths[i], eos, tau)
        assert (got[i].tokens, got[i].depths) == (toks, deps), i
        assert got[i].end is not None and got[i].end.reason == ("stop" if len(toks) < lengths[i] else "length")
    if method == "ponderlm3":  # the router varies depths, so rows really were at different slots
        assert len({d for c in got for d in c.depths}) > 1


def test_cancel_frees_the_row_at_the_next_step_and_others_are_undisturbed():
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=4, tau=0.4))
    prompts = _prompts(3, model.cfg.vocab_size, seed=1)
    got = [Collect() for _ in prompts]
    reqs = [Request(p, 20, on_event=c) for p, c in zip(prompts, got, strict=True)]
    for r in reqs:
        sched.submit(r)
    for _ in range(4):
        sched.step()
    entries = sched.cache.num_entries()
    reqs[1].cancel()
    sched.step()
    assert len(sched.rows) == 2 and sched.cache.batch == 2
    assert got[1].end is not None and got[1].end.reason == "cancelled"
    assert sched.cache.lengths.tolist() == (entries[[0, 2]] + 1).tolist()  # one slot more each; row 1's are gone
    while sched.step():
        pass
    for i in (0, 2):
        assert (got[i].tokens, got[i].depths) == _reference(model, prompts[i], 20, None, 0.4)
    assert sched.cache is None and sched.stats.finished == {"length": 2, "cancelled": 1}


def test_queue_is_bounded():
    model = tiny_model("vanilla")
    sched = Scheduler(model, None, BatchSettings(max_batch=1, max_queue=2))
    sched.submit(Request([1, 2], 3))
    sched.submit(Request([1, 2], 3))
    with pytest.raises(QueueFull):
        sched.submit(Request([1, 2], 3))


def test_finished_reports_flops_of_the_realised_depths():
    from ponderlm.model.flops import inference_flops

    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(tau=0.4))
    c = Collect()
    sched.submit(Request([3, 4, 5], 6, on_event=c))
    while sched.step():
        pass
    end = c.end
    assert end.prompt_tokens == 3 and len(end.depths) == 6
    out = model.generate(torch.tensor([[3, 4, 5]]), 6, tau=0.4, schedule="token")
    fed = torch.cat([out.prompt_depth[0], out.depth[0, 1:]]).unsqueeze(0)  # every token the model ran
    assert end.flops == pytest.approx(inference_flops(model.cfg, fed).total)
    assert end.prompt_flops == pytest.approx(inference_flops(model.cfg, out.prompt_depth).total)


def test_round_methods_are_refused():
    with pytest.raises(ValueError, match="decodes by rounds"):
        Scheduler(tiny_model("loop"), None, BatchSettings())


def _cache(batch: int, lengths: list[int], cap: int, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    c = KVCache(2, batch, 2, 4, device="cpu", dtype=torch.float32, capacity=cap)
    for t in (*c.k, *c.v, c.bias):
        t.copy_(torch.randn(t.shape, generator=g))
    c.lengths = torch.tensor(lengths)
    return c


def test_cache_rows_join_and_leave():
    """Rows join after the others, leave with their places taken; only held entries count."""
    a, b = _cache(2, [3, 5], 8, 0), _cache(1, [6], 16, 1)
    a_k, b_k = [t.clone() for t in a.k], [t.clone() for t in b.k]
    a.append_rows(b)
    assert a.batch == 3 and a.capacity == 8 and a.lengths.tolist() == [3, 5, 6]  # b held 6 of its 16
    assert torch.equal(a.k[1][:2, :, :5], a_k[1][:, :, :5]) and torch.equal(a.k[1][2, :, :6], b_k[1][0, :, :6])
    a.append_empty(2)
    assert a.batch == 5 and a.row_capacity >= 5 and a.lengths.tolist() == [3, 5, 6, 0, 0]
    a.keep_rows(torch.tensor([2, 0]))
    assert a.batch == 2 and a.lengths.tolist() == [6, 3] and a.bias.shape[0] == 2
    assert torch.equal(a.k[0][0, :, :6], b_k[0][0, :, :6]) and torch.equal(a.k[0][1, :, :3], a_k[0][0, :, :3])
    a.keep_rows(torch.tensor([1]))  # a row moves into the place of one that left
    assert torch.equal(a.v[1][0, :, :3], _cache(2, [3, 5], 8, 0).v[1][0, :, :3])
    a.keep_rows(torch.tensor([], dtype=torch.long))
    assert a.batch == 0 and a.capacity == 0 and a.row_capacity == 0 and a.k[0].numel() == 0  # storage freed


def test_ignore_eos_runs_to_max_tokens():
    """The load generator's fixed lengths: with ignore_eos a row goes past EOS, as generate without one."""
    model = tiny_model("ponderlm3", dtype=torch.float64)
    first = int(model.generate(torch.tensor([[3, 4]]), 1, tau=0.4).tokens[0, -1])
    sched = Scheduler(model, first, BatchSettings(tau=0.4))  # the very first token is EOS
    c, stopped = Collect(), Collect()
    sched.submit(Request([3, 4], 6, ignore_eos=True, on_event=c))
    sched.submit(Request([3, 4], 6, on_event=stopped))
    while sched.step():
        pass
    assert (c.tokens, c.depths) == _reference(model, [3, 4], 6, None, 0.4) and c.end.reason == "length"
    assert stopped.tokens == [] and stopped.end.reason == "stop"


def test_a_request_that_fails_at_admission_gets_its_error_and_the_batch_goes_on(capsys):
    model = tiny_model("vanilla", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings())
    bad, good = Collect(), Collect()
    sched.submit(Request([model.cfg.vocab_size + 5], 3, on_event=bad))  # an id beyond the vocabulary
    sched.submit(Request([3, 4], 3, on_event=good))
    while sched.step():
        pass
    assert bad.end.reason == "error" and bad.tokens == []
    assert (good.tokens, good.depths) == _reference(model, [3, 4], 3, None, model.cfg.tau)
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
def test_walked_prompts_equal_exact_prefill_and_long_ones_generate_default(method):
    """In float32, where the two prefills differ in the last bits: prompts up to walk_max tokens
    walk through the batch and give exactly generate(prefill="exact")'s tokens and depths (prompt
    depths too, through the FLOPs); longer ones are prefilled alone and give generate's default."""
    from ponderlm.model.flops import inference_flops

    model = tiny_model(method, dtype=torch.float32)
    tau, walk_max = 0.4, 4
    sched = Scheduler(model, None, BatchSettings(max_batch=3, tau=tau, walk_max=walk_max))
    prompts = _prompts(6, model.cfg.vocab_size, seed=3)
    assert {len(p) <= walk_max for p in prompts} == {True, False}  # both kinds, in one batch
    got = [Collect() for _ in prompts]
    for step in range(400):
        if step < len(prompts):  # one arrival per step: rows join while others walk or decode
            sched.submit(Request(prompts[step], 7, on_event=got[step]))
        if not sched.step() and step >= len(prompts):
            break
    for p, c in zip(prompts, got, strict=True):
        how = "exact" if len(p) <= walk_max else "auto"
        out = model.generate(torch.tensor([p]), 7, tau=tau, prefill=how, schedule="token")
        assert (c.tokens, c.depths) == (out.tokens[0, len(p) :].tolist(), out.depth[0].tolist()), (len(p), how)
        fed = torch.cat([out.prompt_depth[0], out.depth[0, 1:]]).unsqueeze(0)
        assert c.end.flops == inference_flops(model.cfg, fed).total and c.end.prompt_tokens == len(p)


def test_walking_rows_share_the_steps_and_a_bad_id_is_refused_at_admission():
    model = tiny_model("ponderlm3", dtype=torch.float64)
    sched = Scheduler(model, None, BatchSettings(max_batch=4, tau=0.4, prefill="exact"))
    bad, walker, gone = Collect(), Collect(), Collect()
    sched.submit(Request([3, 4, model.cfg.vocab_size], 3, on_event=bad))  # the bad id is the last one
    long = Request(list(range(1, 30)), 2, on_event=gone)
    sched.submit(Request([5, 6, 7, 8], 3, on_event=walker))
    sched.submit(long)
    sched.step()
    assert bad.end.reason == "error" and len(sched.rows) == 2  # refused before it could fail a step
    assert sched.cache.lengths.tolist() == [1, 1]  # both walk: one slot each so far, no prefill
    for _ in range(3):
        sched.step()
    long.cancel()  # cancelled while walking its prompt
    while sched.step():
        pass
    assert gone.end.reason == "cancelled" and gone.end.prompt_tokens == 29 and gone.tokens == []
    assert (walker.tokens, walker.depths) == _reference(model, [5, 6, 7, 8], 3, None, 0.4)
    assert sched.cache is None


def test_batch_settings_are_checked():
    with pytest.raises(ValueError, match="prefill must be one of"):
        BatchSettings(prefill="fast")
    with pytest.raises(ValueError, match="walk_max"):
        BatchSettings(walk_max=-1)


def test_the_engine_queue_takes_a_burst_of_everything_the_server_lets_in():
    """Between two engine steps the server may send max_batch + max_queue requests, none of them
    in a row yet: the engine's queue must take them all (it once held max_queue and crashed)."""
    from ponderlm.serving.engine import _EngineLoop, engine_scheduler

    model = tiny_model("ponderlm3", dtype=torch.float64)
    settings = BatchSettings(max_batch=2, max_queue=3, tau=0.4)
    sent = []

    class Pipe:
        def send(self, msg):
            sent.append(msg)

    loop = _EngineLoop(Pipe(), engine_scheduler(model, None, settings))
    for rid in range(settings.max_batch + settings.max_queue):
        loop.handle(("add", rid, [3, 4], 2, 0.0, None, None, False, None, False))
    while loop.sched.safe_step() or not loop.sched.queue.empty():
        pass
    loop.report()
    done = [ev for _, events, _ in sent for _, ev in events if isinstance(ev, Finished)]
    assert len(done) == 5 and {ev.reason for ev in done} == {"length"}
