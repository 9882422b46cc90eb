"""Property-based tests (hypothesis): random K, lengths, depths, batch shapes and padding must keep
the invariants of the slot layout, the pruning rule, packing, the KV cache and the model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderlm.model import slots
from ponderlm.model.cache import KVCache

from conftest import METHODS, converged_iters, tiny_model

V = 61  # tiny_config's vocab_size
MODEL_EXAMPLES = settings(max_examples=20, deadline=None)
taus = st.floats(0.02, 0.9)
seeds = st.integers(0, 2**16)


def bool_lists(n: int):
    return st.lists(st.booleans(), min_size=n, max_size=n)


def int_rows(rows: int, n: int, lo: int, hi: int):
    """A rows x n nested list of integers in [lo, hi]."""
    return st.lists(st.lists(st.integers(lo, hi), min_size=n, max_size=n), min_size=rows, max_size=rows)


@st.composite
def padded_batch(draw, max_rows: int = 3, max_len: int = 6, layouts=("left", "right", "anywhere")):
    """(ids, mask) as (B, T) tensors: random padding per row, at least one real token in the batch."""
    B = draw(st.integers(1, max_rows))
    T = draw(st.integers(1, max_len))
    layout = draw(st.sampled_from(layouts))
    mask = []
    for b in range(B):
        n = draw(st.integers(1 if b == 0 else 0, T))
        row = [True] * n + [False] * (T - n)
        if layout == "left":
            row = row[::-1]
        elif layout == "anywhere":
            row = draw(st.permutations(row))
        mask.append(row)
    ids = draw(int_rows(B, T, 0, V - 1))
    return torch.tensor(ids), torch.tensor(mask)


@functools.cache
def model_for(method: str, K: int):
    return tiny_model(method, seed=K, max_ponder_steps=K)


# --------------------------------------------------------------------- layout and positions
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(0, 5), c=st.integers(1, 4), trailing=st.lists(st.integers(1, 3), max_size=2))
def test_interleave_round_trip_and_token_major_order(B, T, c, trailing):
    x = torch.randn(B, T, c, *trailing, dtype=torch.float64)
    flat = slots.interleave(x)
    assert flat.shape == (B, T * c, *trailing)
    for b in range(B):
        for t in range(T):
            for k in range(c):
                assert torch.equal(flat[b, t * c + k], x[b, t, k])
    assert torch.equal(slots.deinterleave(flat, c), x)
    y = torch.randn(B, T * c, *trailing, dtype=torch.float64)
    assert torch.equal(slots.interleave(slots.deinterleave(y, c)), y)
    if c > 1:
        with pytest.raises(ValueError, match="multiple"):
            slots.deinterleave(torch.zeros(B, T * c + 1), c)


@settings(max_examples=80, deadline=None)
@given(batch=padded_batch(max_rows=4, max_len=9), S=st.integers(1, 4))
def test_token_positions_count_real_tokens_and_slots_share_them(batch, S):
    _, mask = batch
    B, T = mask.shape
    pos = slots.token_positions(B, T, mask, "cpu")
    assert pos.shape == (B, T) and pos.dtype == torch.long
    for b in range(B):
        n = int(mask[b].sum())
        assert pos[b][mask[b]].tolist() == list(range(n))  # real tokens: 0..n-1 in order
        assert ((pos[b] >= 0) & (pos[b] <= max(n - 1, 0))).all()  # padding gets a valid RoPE index
    free = slots.token_positions(B, T, None, "cpu")
    assert free.tolist() == [list(range(T))] * B
    assert torch.equal(slots.token_positions(B, T, torch.ones(B, T, dtype=torch.bool), "cpu"), free)
    sp = slots.slot_positions(pos, S)
    assert sp.shape == (B, T, S)
    for k in range(S):
        assert torch.equal(sp[..., k], pos)


# ------------------------------------------------------------------------- pruning rule
@st.composite
def monotone_log_reach(draw):
    """(log_reach (B, T, K+1) non-increasing in k with log w_0 = 0, sorted taus); some log w
    values sit exactly on log(tau) to pin down the >= of the rule."""
    B, T, K = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    tau_list = sorted(draw(st.lists(st.floats(1e-6, 1 - 1e-6), min_size=1, max_size=4)))
    value = st.one_of(st.sampled_from([math.log(t) for t in tau_list]), st.floats(-30.0, 0.0), st.just(0.0))
    rows = []
    for _ in range(B * T):
        tail = sorted(draw(st.lists(value, min_size=K, max_size=K)), reverse=True)
        rows.append([0.0, *tail])
    return torch.tensor(rows, dtype=torch.float64).view(B, T, K + 1), tau_list


@settings(max_examples=100, deadline=None)
@given(data=monotone_log_reach())
def test_prune_depth_is_the_naive_rule_and_monotone_in_tau(data):
    log_w, tau_list = data
    B, T, S = log_w.shape
    prev = None
    for tau in tau_list:  # increasing tau
        depth = slots.prune_depth(log_w, tau)
        assert depth.shape == (B, T) and depth.dtype == torch.long
        naive = [
            [max(k for k in range(S) if log_w[b, t, k].item() >= math.log(tau)) for t in range(T)] for b in range(B)
        ]
        assert depth.tolist() == naive
        assert ((depth >= 0) & (depth <= S - 1)).all()
        if prev is not None:
            assert (depth <= prev).all()  # a larger threshold never computes more
        prev = depth


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    K=st.integers(1, 3),
    tau=st.floats(1e-6, 1 - 1e-6),
    data=st.data(),
)
def test_prune_depth_keeps_a_prefix_when_rounding_breaks_monotonicity(B, T, K, tau, data):
    vals = data.draw(st.lists(st.floats(-30.0, 0.0), min_size=B * T * K, max_size=B * T * K))
    tail = torch.tensor(vals, dtype=torch.float64).view(B, T, K)
    log_w = torch.cat([torch.zeros(B, T, 1, dtype=torch.float64), tail], dim=-1)
    depth = slots.prune_depth(log_w, tau)
    for b in range(B):
        for t in range(T):
            run = 0  # leading steps 1..K that pass the threshold
            while run < K and log_w[b, t, run + 1].item() >= math.log(tau):
                run += 1
            assert depth[b, t].item() == run


@settings(max_examples=80, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), K=st.integers(0, 3), data=st.data())
def test_depth_keep_is_a_prefix_of_one_plus_depth_slots(B, T, K, data):
    S = K + 1
    c = data.draw(st.integers(1, S), label="stages")  # warm-up passes use c < S stages
    depth = torch.tensor(data.draw(int_rows(B, T, 0, K)))
    masked = data.draw(st.booleans(), label="masked")
    mask = torch.tensor(data.draw(st.lists(bool_lists(T), min_size=B, max_size=B))) if masked else None
    keep = slots.depth_keep(depth, c, mask)
    assert keep.shape == (B, T, c) and keep.dtype == torch.bool
    for b in range(B):
        for t in range(T):
            real = mask is None or bool(mask[b, t])
            want = [real and k <= depth[b, t].item() for k in range(c)]
            assert keep[b, t].tolist() == want


# ------------------------------------------------------------------------------ packing
@settings(max_examples=100, deadline=None)
@given(
    B=st.integers(1, 4),
    N=st.integers(0, 12),
    trailing=st.lists(st.integers(1, 3), max_size=2),
    seed=seeds,
    data=st.data(),
)
def test_pack_gather_scatter_on_arbitrary_keep_masks(B, N, trailing, seed, data):
    keep = torch.tensor(data.draw(st.lists(bool_lists(N), min_size=B, max_size=B)), dtype=torch.bool).view(B, N)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, *trailing, generator=g, dtype=torch.float64)
    idx, n = slots.pack_slots(keep)
    assert n.tolist() == keep.sum(-1).tolist()
    assert idx.shape == (B, max(n.tolist(), default=0))
    packed = slots.gather_slots(x, idx)
    assert packed.shape == (B, idx.shape[1], *trailing)
    for b in range(B):
        nb = int(n[b])
        kept = [j for j in range(N) if keep[b, j]]
        assert idx[b, :nb].tolist() == kept  # the kept slots, in their original order, at the front
        tail = idx[b, nb:].tolist()
        assert len(set(tail)) == len(tail) and not any(keep[b, j] for j in tail)  # distinct unkept padding
        assert torch.equal(packed[b, :nb], x[b, kept])
    zero = torch.zeros((), dtype=x.dtype)
    mask = keep.view(B, N, *([1] * len(trailing)))
    assert torch.equal(slots.scatter_slots(packed, idx, keep), torch.where(mask, x, zero))
    # scatter alone: real packed rows land on their slot, the packed tail is dropped
    p = torch.randn(packed.shape, generator=g, dtype=torch.float64)
    out = slots.scatter_slots(p, idx, keep)
    for b in range(B):
        nb = int(n[b])
        assert torch.equal(out[b, idx[b, :nb]], p[b, :nb])
    assert (out[~keep] == 0).all()


# ----------------------------------------------------------------------------- KV cache
@st.composite
def cache_script(draw):
    B = draw(st.integers(1, 3))
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        L = draw(st.integers(0, 4))
        n_new = draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
        steps.append((L, n_new, draw(st.booleans())))
    shape = dict(
        n_layers=draw(st.integers(1, 2)),
        batch=B,
        n_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 3)),
        capacity=draw(st.integers(1, 6)),  # small: steps must grow the buffers
    )
    return shape, steps


@settings(max_examples=100, deadline=None)
@given(script=cache_script(), seed=seeds)
def test_kv_cache_rows_match_a_naive_list_per_row(script, seed):
    shape, steps = script
    B, n_layers, Hkv, hd = shape["batch"], shape["n_layers"], shape["n_kv_heads"], shape["head_dim"]
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(**shape, device="cpu", dtype=torch.float64)
    ref_k = [[[] for _ in range(B)] for _ in range(n_layers)]  # ref_k[layer][row] = [(Hkv, hd), ...]
    ref_v = [[[] for _ in range(B)] for _ in range(n_layers)]
    ref_bias = [[] for _ in range(B)]
    for L, n_new, with_bias in steps:
        start = [len(r) for r in ref_bias]
        bias = torch.randn(B, L, generator=g, dtype=torch.float64) if with_bias else None
        cache.begin(torch.tensor(n_new), L, bias)
        new_bias = [[bias[b, i].item() if bias is not None else 0.0 for i in range(L)] for b in range(B)]
        for layer in range(n_layers):
            k = torch.randn(B, Hkv, L, hd, generator=g, dtype=torch.float64)
            v = torch.randn(B, Hkv, L, hd, generator=g, dtype=torch.float64)
            past = cache.update(layer, k, v)
            if past is None:
                assert max(start) == 0, "an empty cache only when no row holds anything"
            else:
                assert max(start) > 0
                k_all, v_all, mask = past
                for b in range(B):
                    for i in range(n_new[b]):  # a real query sees its row's prefix and new slots <= i
                        seen = start[b] + i + 1
                        row = mask[b, 0, i]
                        assert torch.isfinite(row[:seen]).all() and torch.isneginf(row[seen:]).all()
                        assert row[:seen].tolist() == ref_bias[b] + new_bias[b][: i + 1]
                        want_k = torch.stack([*ref_k[layer][b], *k[b, :, : i + 1].unbind(1)], dim=1)
                        want_v = torch.stack([*ref_v[layer][b], *v[b, :, : i + 1].unbind(1)], dim=1)
                        assert torch.equal(k_all[b, :, :seen], want_k)
                        assert torch.equal(v_all[b, :, :seen], want_v)
            for b in range(B):
                ref_k[layer][b] += list(k[b, :, : n_new[b]].unbind(1))
                ref_v[layer][b] += list(v[b, :, : n_new[b]].unbind(1))
        for b in range(B):
            ref_bias[b] += new_bias[b][: n_new[b]]
        cache.end()
        lengths = [len(r) for r in ref_bias]
        assert cache.lengths.tolist() == lengths  # the sum of n_new per row
        assert cache.num_entries().tolist() == lengths
        for b in range(B):
            assert cache.bias[b, : lengths[b]].tolist() == ref_bias[b]
            for layer in range(n_layers):
                if lengths[b]:
                    assert torch.equal(cache.k[layer][b, :, : lengths[b]], torch.stack(ref_k[layer][b], dim=1))
                    assert torch.equal(cache.v[layer][b, :, : lengths[b]], torch.stack(ref_v[layer][b], dim=1))
    assert cache.lengths.tolist() == [sum(s[1][b] for s in steps) for b in range(B)]


# -------------------------------------------------------------------------------- model
@torch.no_grad()
def forced_depth_recurrence(model, ids: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Reference PonderLM-3 logits: the sequential recurrence with a KV cache, slot by slot, at the
    given depths instead of the router's; the output mixes the computed slots by s."""
    B, T = ids.shape
    K = model.cfg.n_latent
    e = model.embed(ids)
    cache = model.new_cache(B)
    steps = torch.arange(K + 1)
    out = []
    for t in range(T):
        pos = torch.full((B, 1), t)
        h = model.stack(e[:, t : t + 1], pos, None, cache, torch.ones(B, dtype=torch.long))[:, 0]
        s, log_w = model.route(h)
        hs = [h]
        for k in range(1, K + 1):
            active = (depth[:, t] >= k).long()
            h = model.stack(h.unsqueeze(1), pos, log_w[:, k : k + 1], cache, active)[:, 0]
            hs.append(h)
        wts = s * (steps <= depth[:, t : t + 1])  # (B, K+1)
        out.append((wts.unsqueeze(-1) * torch.stack(hs, dim=1)).sum(1))
    assert cache.lengths.tolist() == (depth + 1).sum(-1).tolist()
    return model.lm_head(torch.stack(out, dim=1))


@MODEL_EXAMPLES
@given(
    K=st.integers(1, 3),
    B=st.integers(1, 2),
    T=st.integers(1, 5),
    seed=seeds,
    tau=taus,
)
def test_converged_hard_mode_equals_the_recurrence_at_random_depths(K, B, T, seed, tau):
    model = model_for("ponderlm3", K)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    depth = torch.randint(0, K + 1, (B, T), generator=g)
    J = converged_iters(T, K)
    with torch.no_grad():
        hard = model(ids, mode="hard", jacobi_iters=J, depth_override=depth)
        exact = model(ids, mode="exact", tau=tau)
        routed = model(ids, mode="hard", tau=tau, jacobi_iters=J)
    torch.testing.assert_close(hard.logits, forced_depth_recurrence(model, ids, depth), atol=1e-10, rtol=0)
    assert torch.equal(hard.depth, depth.double())
    # the reference at the router's depths is the library's exact mode, and so is hard mode at tau
    reference = forced_depth_recurrence(model, ids, exact.depth.long())
    torch.testing.assert_close(reference, exact.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(routed.logits, exact.logits, atol=1e-10, rtol=0)
    assert torch.equal(routed.depth, exact.depth)


@MODEL_EXAMPLES
@given(
    method=st.sampled_from(METHODS),
    K=st.integers(1, 3),
    batch=padded_batch(),
    J=st.integers(1, 3),
    tau=taus,
    override=st.booleans(),
    seed=seeds,
)
def test_hard_mode_rows_do_not_see_their_padding(method, K, batch, J, tau, override, seed):
    """Each row of a padded batch (left, right or scattered padding) gives, at its real positions,
    the logits and depths of its real tokens run alone; padded positions give zeros."""
    model = model_for(method, K)
    ids, mask = batch
    depth = None
    if override and method == "ponderlm3":  # random depths, arbitrary values under the padding
        depth = torch.randint(0, K + 1, ids.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids, mode="hard", tau=tau, jacobi_iters=J, attention_mask=mask, depth_override=depth)
        for b in range(ids.shape[0]):
            real = mask[b]
            assert (out.logits[b][~real] == 0).all() and (out.depth[b][~real] == 0).all()
            if not real.any():
                continue
            d = depth[b][real][None] if depth is not None else None
            alone = model(ids[b][real][None], mode="hard", tau=tau, jacobi_iters=J, depth_override=d)
            torch.testing.assert_close(out.logits[b][real], alone.logits[0], atol=1e-10, rtol=0)
            assert torch.equal(out.depth[b][real], alone.depth[0])


@MODEL_EXAMPLES
@given(K=st.integers(1, 3), batch=padded_batch(max_rows=2, max_len=5, layouts=("left",)), tau=taus)
def test_exact_and_converged_hard_agree_with_left_padding(K, batch, tau):
    model = model_for("ponderlm3", K)
    ids, mask = batch
    with torch.no_grad():
        exact = model(ids, mode="exact", tau=tau, attention_mask=mask)
        hard = model(ids, mode="hard", tau=tau, jacobi_iters=converged_iters(ids.shape[1], K), attention_mask=mask)
    torch.testing.assert_close(hard.logits, exact.logits, atol=1e-10, rtol=0)
    assert torch.equal(hard.depth, exact.depth)
    # only computed slots enter the cache: padding adds nothing, a real token 1 + its depth
    assert exact.cache.lengths.tolist() == ((exact.depth.long() + 1) * mask).sum(-1).tolist()


@MODEL_EXAMPLES
@given(
    method=st.sampled_from(METHODS),
    K=st.integers(1, 3),
    B=st.integers(1, 2),
    T=st.integers(2, 6),
    J=st.integers(1, 3),
    tau=taus,
    seed=seeds,
    data=st.data(),
)
def test_hard_mode_is_causal(method, K, B, T, J, tau, seed, data):
    """Changing token p (the last one or any other) never changes logits or depths before p."""
    model = model_for(method, K)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    p = data.draw(st.one_of(st.just(T - 1), st.integers(1, T - 1)), label="changed position")
    changed = ids.clone()
    changed[:, p] = (changed[:, p] + data.draw(st.integers(1, V - 1), label="shift")) % V
    with torch.no_grad():
        base = model(ids, mode="hard", tau=tau, jacobi_iters=J)
        out = model(changed, mode="hard", tau=tau, jacobi_iters=J)
    torch.testing.assert_close(out.logits[:, :p], base.logits[:, :p], atol=1e-12, rtol=0)
    assert torch.equal(out.depth[:, :p], base.depth[:, :p])
    assert not torch.allclose(out.logits[:, p], base.logits[:, p])  # the change itself is seen


@MODEL_EXAMPLES
@given(K=st.integers(1, 3), B=st.integers(1, 2), T=st.integers(2, 6), J=st.integers(1, 3), seed=seeds, data=st.data())
def test_depth_override_is_realised_and_causal(K, B, T, J, seed, data):
    """PonderLM-3 at forced depths: out.depth is the override, and changing the depth of token p
    leaves every earlier position untouched, at any J."""
    model = model_for("ponderlm3", K)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    depth = torch.randint(0, K + 1, (B, T), generator=g)
    p = data.draw(st.integers(0, T - 1), label="changed position")
    other = depth.clone()
    other[:, p] = (other[:, p] + data.draw(st.integers(1, K), label="shift")) % (K + 1)
    with torch.no_grad():
        base = model(ids, mode="hard", jacobi_iters=J, depth_override=depth)
        out = model(ids, mode="hard", jacobi_iters=J, depth_override=other)
    assert torch.equal(base.depth, depth.double()) and torch.equal(out.depth, other.double())
    torch.testing.assert_close(out.logits[:, :p], base.logits[:, :p], atol=1e-12, rtol=0)
    assert not torch.allclose(out.logits[:, p], base.logits[:, p])
