"""The baselines of docs/DESIGN.md section 1 (pause, loop, PonderLM-1) against direct re-implementations
of their definitions from the model's primitives, plus what sets them apart from each other."""

import pytest
import torch

from ponderlm.model import flops
from ponderlm.model.losses import ponder_loss

from conftest import tiny_model

T = 7


def ids_for(model, B=2, L=T):
    return torch.randint(0, model.cfg.vocab_size, (B, L))


def run_layers(model, x, pos):
    """The block stack without the final norm, by hand (no cache, no bias)."""
    rope = model.rope(pos, x.dtype)
    for layer in model.layers:
        x = layer(x, rope, None)
    return x


def test_pause_is_learned_slots_at_the_token_position_read_from_the_last():
    model = tiny_model("pause", max_ponder_steps=3)
    ids = ids_for(model)
    B, K, D = ids.shape[0], 3, model.cfg.d_model
    e = model.embed(ids)  # (B, T, D)
    pause = model.pause_embed.weight * model.cfg.embed_scale  # (K, D)
    seq = torch.cat([e.unsqueeze(2), pause.expand(B, T, K, D)], dim=2).reshape(B, T * (K + 1), D)
    pos = torch.arange(T).repeat_interleave(K + 1).expand(B, -1)
    h = model.norm(run_layers(model, seq, pos)).view(B, T, K + 1, D)[:, :, -1]
    want = model.lm_head(h)
    for mode in ("soft", "hard", "exact"):
        torch.testing.assert_close(model(ids, mode=mode).logits, want, atol=1e-12, rtol=0)
    # no feedback: one pass is already exact, whatever J says
    torch.testing.assert_close(model(ids, mode="soft", jacobi_iters=1).logits, want, atol=1e-12, rtol=0)


def test_loop_applies_the_shared_stack_k_plus_1_times():
    model = tiny_model("loop", max_ponder_steps=2)
    ids = ids_for(model)
    x = model.embed(ids)
    pos = torch.arange(T).expand(ids.shape[0], -1)
    for _ in range(3):
        x = run_layers(model, x, pos)
    want = model.lm_head(model.norm(x))
    for mode in ("soft", "hard", "exact"):
        torch.testing.assert_close(model(ids, mode=mode).logits, want, atol=1e-12, rtol=0)
    assert model.num_parameters() == tiny_model("vanilla").num_parameters()  # weights shared


def test_ponderlm1_feeds_back_the_expected_embedding():
    model = tiny_model("ponderlm1", max_ponder_steps=2)
    ids = ids_for(model)
    e = model.embed(ids)
    pos = torch.arange(T).expand(ids.shape[0], -1)
    x = e
    for _ in range(3):
        h = model.norm(run_layers(model, x, pos))
        p = torch.softmax(model.lm_head(h), -1)
        x = e + (p @ model.embed_tokens.weight) * model.cfg.embed_scale
    want = model.lm_head(h)
    for mode in ("soft", "hard", "exact"):
        torch.testing.assert_close(model(ids, mode=mode).logits, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["pause", "loop", "ponderlm1"])
def test_baselines_differ_from_vanilla_and_train(method):
    """K matters (K=1 and K=2 give different outputs), and gradients reach every parameter."""
    ids = ids_for(tiny_model("vanilla"))
    a = tiny_model(method, max_ponder_steps=1)(ids, mode="soft").logits
    b = tiny_model(method, max_ponder_steps=2)(ids, mode="soft").logits
    assert (a - b).abs().max() > 1e-3
    model = tiny_model(method).train()
    out = model(ids[:, :-1], mode="soft")
    loss, metrics = ponder_loss(out, ids[:, 1:], model.cfg)
    loss.backward()
    assert float(metrics["mean_depth"]) == pytest.approx(2.0)
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, missing


@pytest.mark.parametrize("method", ["pause", "loop", "ponderlm1"])
def test_baseline_cache_holds_k_plus_1_entries_per_token(method):
    model = tiny_model(method)
    out = model(ids_for(model), mode="exact")
    assert torch.equal(out.cache.num_entries(), torch.full((2,), 3 * T))
    assert (out.depth == 2).all()


def test_flops_order_of_the_baselines():
    """Round methods repeat the whole stack over T tokens; pause/PonderLM-2 attend over (K+1)T slots;
    PonderLM-1 also pays 2K extra vocabulary matmuls per token."""
    cfgs = {m: tiny_model(m, max_ponder_steps=3).cfg for m in ("vanilla", "pause", "loop", "ponderlm1", "ponderlm2")}
    f = {m: flops.fixed_depth_inference_flops(c, 32) for m, c in cfgs.items()}
    assert f["loop"].linear == f["pause"].linear == f["ponderlm2"].linear == 4 * f["vanilla"].linear
    assert f["loop"].attention == 4 * f["vanilla"].attention  # same context per round
    assert f["pause"].attention == f["ponderlm2"].attention > 4 * f["vanilla"].attention
    assert f["ponderlm1"].head == 7 * f["vanilla"].head
    # training: only latent thoughts pay for Jacobi passes
    train = {m: flops.training_flops_per_token(c, 32) for m, c in cfgs.items()}
    assert train["pause"] == pytest.approx(3 * f["pause"].per_token, rel=0.1)
    assert train["ponderlm2"] > 3 * train["pause"]  # J+K+1 passes, each backpropagated
    # with the last pass backpropagated, the others still cost a forward each
    last = flops.training_flops_per_token(cfgs["ponderlm2"].replace(jacobi_grad_passes=1), 32)
    assert 2 * train["pause"] < last < train["ponderlm2"]
