"""Decoding: greedy generate equals repeated exact forwards; batching with left padding and
different per-row depths changes nothing; sampling is seeded."""

import pytest
import torch

from ponderlm.model.generate import sample_next
from ponderlm.model.recurrence import prefill

from conftest import METHODS, converged_iters, tiny_model

TAU = 0.4


SCHEDULES = [(m, s) for m in METHODS for s in ("token", "slot") if s == "token" or m not in ("loop", "ponderlm1")]


@pytest.mark.parametrize("method, schedule", SCHEDULES)
def test_greedy_generate_equals_repeated_exact(method, schedule):
    model = tiny_model(method)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5))
    out = model.generate(prompt, 6, tau=TAU, schedule=schedule)
    assert out.tokens.shape == (2, 11) and out.depth.shape == (2, 6)
    seq = prompt
    for i in range(6):
        ex = model(seq, mode="exact", tau=TAU)
        nxt = ex.logits[:, -1].argmax(-1)
        assert torch.equal(nxt, out.tokens[:, 5 + i])
        assert torch.equal(ex.depth[:, -1].long(), out.depth[:, i])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    # pruned slots never enter the cache: one entry per computed slot
    full = model(out.tokens[:, :-1], mode="exact", tau=TAU)
    assert torch.equal(out.cache_entries, (1 + full.depth.long()).sum(-1))
    if method == "ponderlm3":
        assert len(out.depth.unique()) >= 2, "rows/steps should take different depths"


@pytest.mark.parametrize("method, schedule", SCHEDULES)
def test_batched_left_padded_generate_equals_single_rows(method, schedule):
    model = tiny_model(method)
    V = model.cfg.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (3, 6, 1)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = p
        mask[b, T - len(p) :] = 1
    batched = model.generate(ids, 5, tau=TAU, attention_mask=mask, schedule=schedule)
    for b, p in enumerate(prompts):
        single = model.generate(p[None], 5, tau=TAU, schedule="token")
        assert torch.equal(batched.tokens[b, T:], single.tokens[0, len(p) :])
        assert torch.equal(batched.depth[b], single.depth[0])
        assert torch.equal(batched.prompt_depth[b, T - len(p) :], single.prompt_depth[0])
        assert (batched.prompt_depth[b, : T - len(p)] == 0).all()
        assert batched.cache_entries[b] == single.cache_entries[0]


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
@pytest.mark.parametrize("schedule", ["token", "slot"])
def test_parallel_prefill_equals_exact_prefill(method, schedule):
    model = tiny_model(method)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    a = model.generate(ids, 4, tau=TAU, attention_mask=mask, prefill="exact", schedule="token")
    b = model.generate(ids, 4, tau=TAU, attention_mask=mask, prefill="parallel", jacobi_iters=converged_iters(6, 2),
                       schedule=schedule)  # fmt: skip
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.depth, b.depth) and torch.equal(a.prompt_depth, b.prompt_depth)
    assert torch.equal(a.cache_entries, b.cache_entries)


@pytest.mark.parametrize("schedule", ["token", "slot"])
def test_sampling_is_seeded_and_eos_stops_rows(schedule):
    model = tiny_model("ponderlm3")
    ids = torch.randint(0, model.cfg.vocab_size, (3, 4))
    kw = dict(temperature=1.0, top_k=10, top_p=0.9, schedule=schedule)
    a = model.generate(ids, 8, seed=7, **kw)
    b = model.generate(ids, 8, seed=7, **kw)
    c = model.generate(ids, 8, seed=8, **kw)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    eos = int(a.tokens[0, 5])  # a token row 0 emits at step 1
    d = model.generate(ids, 8, seed=7, eos_token_id=eos, **kw)
    row = d.tokens[0, 4:]
    first = int((row == eos).nonzero()[0])
    assert (row[first:] == eos).all()
    assert (d.depth[0, first + 1 :] == 0).all()


@pytest.mark.parametrize("method", ["vanilla", "pause", "ponderlm2", "ponderlm3"])
def test_slot_schedule_equals_token_schedule_and_runs_one_call_per_slot(method, monkeypatch):
    """The slot schedule gives the token schedule's tokens, depths and cache, with EOS and left
    padding; and it calls the stack once per slot of the row with the most slots, where the token
    schedule pays for the deepest row at every token."""
    model = tiny_model(method)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :5] = 0
    kw = dict(tau=TAU, attention_mask=mask, prefill="exact")  # the prompt slot by slot too
    ref = model.generate(ids, 7, schedule="token", **kw)
    eos = int(ref.tokens[2, 8])  # row 2 stops early; others may too
    calls = {"n": 0}
    real_stack = model.stack

    def counting(*a, **kw):
        calls["n"] += 1
        return real_stack(*a, **kw)

    outs = {}
    for schedule in ("token", "slot"):
        calls["n"] = 0
        monkeypatch.setattr(model, "stack", counting)
        outs[schedule] = (model.generate(ids, 7, eos_token_id=eos, schedule=schedule, **kw), calls["n"])
    (a, n_token), (b, n_slot) = outs["token"], outs["slot"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.prompt_depth, b.prompt_depth) and torch.equal(a.cache_entries, b.cache_entries)
    assert (b.tokens[2, 9:] == eos).all()
    # every running row computes one slot per call: calls = the largest number of slots a row
    # computes = its prompt slots plus the slots of the generated tokens it pondered
    assert n_slot == int(b.cache_entries.max())
    assert n_slot <= n_token
    if method == "ponderlm3":
        assert n_slot < n_token, "with different depths per row the slot schedule should need fewer calls"


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_k=1, generator=g)) for _ in range(20)}
    assert picks == {1}
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(20)}
    assert picks == {1}
    picks = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(50)}
    assert picks == {1, 2}


def test_generate_rejects_bad_input():
    model = tiny_model("ponderlm3")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids, model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="tau"):
        model.generate(ids, 2, tau=1.5)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="token ids must lie"):
        model.generate(ids + 1000, 2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
        ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be None or a finite number in (0, 1], got nan"),
        ({"temperature": 1.0, "top_k": float("inf")}, "top_k must be None or an integer >= 1, got inf"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be None or an integer >= 1, got 0"),
    ],
)
def test_generate_checks_sampling_values_at_its_boundary(kw, message, monkeypatch):
    """Non-finite sampling values are refused by generate itself, before any forward pass: they
    used to reach torch.multinomial and fail there with a RuntimeError."""
    model = tiny_model("ponderlm3")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 4))

    def no_forward(*a, **k):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(model, "stack", no_forward)  # every slot, parallel or exact, is computed there
    with pytest.raises(ValueError) as e:
        model.generate(ids, 2, seed=0, **kw)
    assert str(e.value) == message


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("schedule", ["token", "slot"])
def test_converged_prefill_equals_exact_within_tolerance(method, schedule):
    """prefill="converged": parallel passes until the latents stop moving, the cache filled from
    the converged pass; the prompt's logits equal exact's to the tolerance, and greedy decoding
    from it is exact decoding (tiny float64 models, left padding, PonderLM-3 pruning at tau)."""
    if schedule == "slot" and method in ("loop", "ponderlm1"):
        pytest.skip("round methods decode by token")
    model = tiny_model(method)
    ids = torch.randint(0, 61, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    out, _ = prefill(model, ids, attention_mask=mask, how="converged", tau=0.35)
    ref, _ = prefill(model, ids, attention_mask=mask, how="exact", tau=0.35)
    assert (out.logits - ref.logits).abs().max() < 1e-3
    assert torch.equal(out.depth, ref.depth)
    if model.cfg.uses_jacobi:
        assert out.converged and out.jacobi_passes < len(model.cfg.pass_schedule(30))
    a = model.generate(ids, 6, attention_mask=mask, tau=0.35, prefill="converged", schedule=schedule)
    b = model.generate(ids, 6, attention_mask=mask, tau=0.35, prefill="exact", schedule=schedule)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.prompt_depth, b.prompt_depth) and torch.equal(a.cache_entries, b.cache_entries)


def test_converged_prefill_falls_back_to_exact_when_it_cannot_converge():
    model = tiny_model("ponderlm2", max_ponder_steps=2)
    ids = torch.randint(0, 61, (2, 20))
    out, cache = prefill(model, ids, how="converged", jacobi_iters=1)  # a cap of one refinement
    ref, _ = prefill(model, ids, how="exact")
    assert torch.equal(out.logits, ref.logits)  # it ran the exact recurrence
    assert out.converged is None and torch.equal(cache.lengths, torch.full((2,), 20 * 3))
