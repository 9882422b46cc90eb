"""``model.jacobi_grad_passes=n``: backpropagation through the last n passes of the soft
computation only. The forward is the same computation bit for bit; the gradients equal those of a
hand-made cut - the full computation with the latent inputs and the key bias of pass P-n
detached - and differ from the full gradients."""

import pytest
import torch

from ponderlm import ModelConfig

from conftest import tiny_model


def grads(model, ids, J, cut_at=None):
    """Loss gradients; with cut_at=p, the latent slots' inputs and the key bias entering pass p
    are detached by hand (the reference for truncated backprop)."""
    model.zero_grad()
    real_pass, calls = model._pass, []

    def cut(x, tok_pos, log_reach, keep, cache=None, final_norm=True):
        if len(calls) == cut_at:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].detach()], dim=2)  # the token slot keeps its embedding's graph
            log_reach = log_reach.detach() if log_reach is not None else None
        calls.append(x.shape[2])
        return real_pass(x, tok_pos, log_reach, keep, cache, final_norm)

    model._pass = cut
    try:
        out = model(ids, mode="soft", jacobi_iters=J)
    finally:
        del model._pass
    out.logits.square().mean().backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
@pytest.mark.parametrize("n", [1, 2])
def test_truncated_backprop_equals_a_manual_cut(method, n):
    torch.manual_seed(0)
    full = tiny_model(method, seed=1, jacobi_grad_passes=0)
    trunc = tiny_model(method, seed=1, jacobi_grad_passes=n)
    ids = torch.randint(0, 61, (2, 9))
    J = 3
    passes = len(full.cfg.pass_schedule(J))
    cut_logits, ref = grads(full, ids, J, cut_at=passes - n)
    all_logits, every = grads(full, ids, J)
    logits, got = grads(trunc, ids, J)
    assert torch.equal(logits, all_logits) and torch.equal(cut_logits, all_logits)  # the forward is unchanged
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-12, rtol=0)
    assert any(not torch.allclose(got[k], every[k]) for k in ref)  # and it is a different gradient


@pytest.mark.parametrize("method", ["vanilla", "pause", "loop", "ponderlm1"])
def test_truncation_leaves_exact_methods_alone(method):
    ids = torch.randint(0, 61, (2, 9))
    _, a = grads(tiny_model(method, seed=1, jacobi_grad_passes=0), ids, 3)
    _, b = grads(tiny_model(method, seed=1, jacobi_grad_passes=1), ids, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_backpropagates_every_pass():
    """Truncation is opt-in (docs/PERFORMANCE.md: it changed what PonderLM-2 learns): the default
    gives every parameter the gradient of every pass, as the PonderLM-2 release does."""
    assert ModelConfig().jacobi_grad_passes == 0
    ids = torch.randint(0, 61, (2, 9))
    _, got = grads(tiny_model("ponderlm3", seed=1), ids, 3)
    _, every = grads(tiny_model("ponderlm3", seed=1, jacobi_grad_passes=99), ids, 3)  # more than there are
    assert sorted(got) == sorted(every) and all(torch.equal(got[k], every[k]) for k in got)
