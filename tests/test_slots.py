import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderlm.model import slots

from conftest import dense_slot_bias


def test_interleave_order_is_token_major():
    x = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (B, T, S)
    flat = slots.interleave(x)
    assert flat[0].tolist() == list(range(12))
    assert torch.equal(slots.deinterleave(flat, 4), x)


def test_positions_shared_within_token_and_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = slots.token_positions(2, 5, mask, "cpu")
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    sp = slots.slot_positions(pos, 3)
    assert sp.shape == (2, 5, 3) and torch.equal(sp[..., 2], pos)


def test_prune_depth_rule():
    w = torch.tensor([[1.0, 0.9, 0.5, 0.01], [1.0, 0.3, 0.3, 0.3]])
    logw = w.log().unsqueeze(0)  # (1, 2, 4)
    assert slots.prune_depth(logw, 0.4).tolist() == [[2, 0]]
    assert slots.prune_depth(logw, 0.005).tolist() == [[3, 3]]
    assert slots.prune_depth(logw, 0.95).tolist() == [[0, 0]]
    # the prefix property holds even if w were not monotone (rounding)
    bad = torch.tensor([[[0.0, math.log(0.1), math.log(0.5)]]])
    assert slots.prune_depth(bad, 0.2).tolist() == [[0]]


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 7),
    K=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_pack_scatter_round_trip(B, T, K, seed):
    g = torch.Generator().manual_seed(seed)
    S = K + 1
    depth = torch.randint(0, S, (B, T), generator=g)
    tok = torch.rand(B, T, generator=g) > 0.2
    keep = slots.depth_keep(depth, S, tok)  # (B, T, S)
    flat = slots.interleave(keep)
    idx, n = slots.pack_slots(flat)
    assert torch.equal(n, flat.sum(-1))
    x = torch.randn(B, T * S, 5, generator=g)
    packed = slots.gather_slots(x, idx)
    for b in range(B):  # kept slots, in their original order, at the front
        want = x[b][flat[b]]
        assert torch.equal(packed[b, : int(n[b])], want)
    back = slots.scatter_slots(packed, idx, flat)
    assert torch.equal(back, torch.where(flat.unsqueeze(-1), x, torch.zeros(())))
    # keep is a prefix of each token's slots, and padding tokens keep nothing
    assert torch.equal(keep.sum(-1), torch.where(tok, depth + 1, torch.zeros_like(depth)))


def test_dense_slot_bias_reference():
    bias = torch.tensor([[0.0, -1.0, 0.0]])
    m = dense_slot_bias(bias)[0]
    assert m[0, 1] == float("-inf") and m[2, 1] == -1.0 and m[1, 1] == -1.0 and m[2, 0] == 0.0
