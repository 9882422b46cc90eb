"""Inference-time ablations: the same PonderLM-3 weights with other depth allocations."""

import pytest
import torch

from ponderlm.eval.ablations import Ablation, ablation_depths, allocate
from ponderlm.eval.perplexity import perplexity

from conftest import converged_iters, tiny_model

T = 7


def test_allocate_keeps_the_router_histogram():
    g = torch.Generator().manual_seed(0)
    router = torch.tensor([[0, 2, 2, 1], [1, 0, 2, 0]])
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.0]])
    rnd = allocate("random", router, generator=g)
    ent = allocate("entropy", router, entropy)
    for d in (rnd, ent):
        assert torch.equal(torch.bincount(d.flatten(), minlength=3), torch.bincount(router.flatten(), minlength=3))
    assert not torch.equal(rnd, router)  # this seed moves depths around
    # highest entropy gets the deepest: order by entropy is 0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0
    assert ent.tolist() == [[0, 2, 1, 1], [2, 0, 2, 0]]
    assert (allocate("fixed", router, depth=1) == 1).all()
    with pytest.raises(ValueError):
        Ablation("fixed")
    with pytest.raises(ValueError):
        Ablation("oracle")


def test_override_with_the_router_depths_reproduces_router_pruning():
    model = tiny_model("ponderlm3")
    ids = torch.randint(0, model.cfg.vocab_size, (2, T))
    J = converged_iters(T, 2)
    ref = model(ids, mode="hard", tau=0.4, jacobi_iters=J)
    assert len(ref.depth.unique()) > 1
    again = model(ids, mode="hard", tau=0.4, jacobi_iters=J, depth_override=ref.depth.long())
    torch.testing.assert_close(again.logits, ref.logits, atol=1e-10, rtol=0)
    assert torch.equal(again.depth, ref.depth)
    full = model(ids, mode="hard", tau=1e-30, jacobi_iters=J)
    forced = model(ids, mode="hard", jacobi_iters=J, depth_override=torch.full_like(ids, 2))
    torch.testing.assert_close(forced.logits, full.logits, atol=1e-10, rtol=0)


def test_override_rejects_bad_use():
    model = tiny_model("ponderlm3")
    ids = torch.randint(0, model.cfg.vocab_size, (1, T))
    with pytest.raises(ValueError, match="hard"):
        model(ids, mode="soft", depth_override=torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model(ids, mode="hard", depth_override=torch.full_like(ids, 3))
    with pytest.raises(ValueError, match="PonderLM-3"):
        ablation_depths(tiny_model("ponderlm2"), ids, Ablation("random"), tau=0.1, jacobi_iters=2)


def test_ablated_perplexity_is_iso_flops_and_changes_the_loss():
    model = tiny_model("ponderlm3", dtype=torch.float32, max_seq_len=16)
    windows = torch.randint(0, model.cfg.vocab_size, (8, 17))
    base = perplexity(model, windows, tau=0.4, batch_size=4)
    for policy in ("random", "entropy"):
        r = perplexity(model, windows, tau=0.4, batch_size=4, ablation=Ablation(policy))
        assert r["depth_hist"] == pytest.approx(base["depth_hist"])  # same depths, moved around
        assert r["mean_depth"] == pytest.approx(base["mean_depth"])
        assert r["flops_per_token"] == pytest.approx(base["flops_per_token"], rel=0.02)  # context differs a bit
        assert r["loss"] != pytest.approx(base["loss"], abs=1e-7)
    fixed = [perplexity(model, windows, batch_size=4, ablation=Ablation("fixed", depth=d)) for d in range(3)]
    assert [f["mean_depth"] for f in fixed] == [0.0, 1.0, 2.0]
    assert fixed[0]["flops_per_token"] < fixed[1]["flops_per_token"] < fixed[2]["flops_per_token"]


@pytest.mark.parametrize("method", ["pause", "ponderlm2", "loop"])
def test_override_is_refused_where_the_output_slot_could_go_uncomputed(method):
    model = tiny_model(method)
    ids = torch.randint(0, model.cfg.vocab_size, (1, T))
    with pytest.raises(ValueError, match="PonderLM-3"):
        model(ids, mode="hard", depth_override=torch.zeros_like(ids))


@pytest.mark.parametrize("method", ["vanilla", "pause", "loop", "ponderlm2", "ponderlm3"])
def test_all_padding_batch_gives_zeros(method):
    model = tiny_model(method)
    ids = torch.randint(0, model.cfg.vocab_size, (2, T))
    out = model(ids, mode="hard", attention_mask=torch.zeros_like(ids))
    assert (out.logits == 0).all() and (out.depth == 0).all()
