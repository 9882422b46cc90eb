"""The invariants of docs/DESIGN.md section 6, on tiny float64 models, for every method they apply to."""

import pytest
import torch

from ponderlm.model import slots

from conftest import METHODS, converged_iters, tiny_model

T = 7  # tokens per test sequence
TAU_PRUNE = 0.4  # with router_init_bias=0 this prunes some tokens to depth 0 or 1, not all


def rand_ids(model, B=2, L=T):
    return torch.randint(0, model.cfg.vocab_size, (B, L))


# ------------------------------------------------------------- invariant 2
@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
@pytest.mark.parametrize("warmup", ["staged", "zeros"])
def test_jacobi_converges_to_exact_recurrence(method, warmup):
    model = tiny_model(method, jacobi_warmup=warmup)
    ids = rand_ids(model)
    exact = model(ids, mode="exact", tau=1e-12)  # nothing pruned: exact == soft's fixed point
    soft = model(ids, mode="soft", jacobi_iters=converged_iters(T, 2))
    assert (soft.logits - exact.logits).abs().max() < 1e-10
    assert soft.jacobi_residual < 1e-10
    few = model(ids, mode="soft", jacobi_iters=1)  # ...and the iterations matter
    assert (few.logits - exact.logits).abs().max() > 1e-4


def test_jacobi_error_contracts_with_iterations():
    model = tiny_model("ponderlm2", n_layers=3, max_ponder_steps=3)
    ids = rand_ids(model, L=20)
    exact = model(ids, mode="exact").logits
    errs = [(model(ids, mode="soft", jacobi_iters=j).logits - exact).abs().max().item() for j in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2]


def test_jacobi_float32_tolerance():
    model = tiny_model("ponderlm3", dtype=torch.float32)
    ids = rand_ids(model)
    exact = model(ids, mode="exact", tau=1e-12)
    soft = model(ids, mode="soft", jacobi_iters=converged_iters(T, 2))
    assert (soft.logits - exact.logits).abs().max() < 1e-3


# ------------------------------------------------------------- invariant 3
@pytest.mark.parametrize("method", METHODS)
def test_cached_exact_equals_full_recomputation(method):
    """The KV-cache recurrence equals recomputing from scratch without any cache (converged
    parallel pass), with pruning active; also token-by-token on growing prefixes."""
    model = tiny_model(method)
    ids = rand_ids(model)
    exact = model(ids, mode="exact", tau=TAU_PRUNE)
    full = model(ids, mode="hard", tau=TAU_PRUNE, jacobi_iters=converged_iters(T, 2))
    torch.testing.assert_close(exact.logits, full.logits, atol=1e-10, rtol=0)
    assert torch.equal(exact.depth, full.depth)
    for t in (1, 4):  # a fresh run on a prefix gives the same outputs at those positions
        pre = model(ids[:, :t], mode="exact", tau=TAU_PRUNE)
        torch.testing.assert_close(pre.logits, exact.logits[:, :t], atol=1e-12, rtol=0)


def test_hard_and_exact_agree_with_pruning_and_count_cache_entries():
    model = tiny_model("ponderlm3")
    ids = rand_ids(model, B=3, L=9)
    exact = model(ids, mode="exact", tau=TAU_PRUNE)
    hard = model(ids, mode="hard", tau=TAU_PRUNE, jacobi_iters=converged_iters(9, 2))
    torch.testing.assert_close(hard.logits, exact.logits, atol=1e-10, rtol=0)
    assert torch.equal(hard.depth, exact.depth)
    d = exact.depth.long()
    assert d.min() < 2 and len(d.unique()) >= 2, "tau should prune some tokens, not all alike"
    # pruned slots never enter the cache: entries == sum over tokens of (1 + realised depth)
    assert torch.equal(exact.cache.lengths, (1 + d).sum(-1))
    # and the depth is exactly the pruning rule applied to the router's reach probabilities
    assert torch.equal(slots.prune_depth(exact.log_reach, TAU_PRUNE), d)


# ------------------------------------------------------------- invariant 4
def _saturated_router(model, scale=1e4):
    with torch.no_grad():
        model.router.proj.weight.mul_(scale)
        model.router.proj.bias.zero_()
    return model


def test_saturated_soft_mask_equals_physical_pruning():
    """w in {0, 1}: the soft computation (bias log w on every key) equals the hard one, which
    removes the pruned slots from the sequence."""
    model = _saturated_router(tiny_model("ponderlm3", seed=3))
    ids = rand_ids(model, B=3, L=T)
    J = converged_iters(T, 2)
    soft = model(ids, mode="soft", jacobi_iters=J)
    probs = soft.router_probs
    assert ((probs < 1e-12) | (probs > 1 - 1e-12)).all(), "router is not saturated"
    hard = model(ids, mode="hard", tau=0.5, jacobi_iters=J)
    assert len(hard.depth.unique()) >= 2, "want tokens at different depths"
    torch.testing.assert_close(soft.logits, hard.logits, atol=1e-8, rtol=0)
    torch.testing.assert_close(soft.depth, hard.depth.double(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("K", [1, 3])
def test_pass_with_floor_bias_equals_removed_slots(K):
    """One pass at random per-token depths: bias log w in {0, floor} vs. slots removed."""
    model = tiny_model("ponderlm3", max_ponder_steps=K)
    B, S, D = 2, K + 1, model.cfg.d_model
    x = torch.randn(B, T, S, D, dtype=torch.float64)
    depth = torch.randint(0, S, (B, T))
    keep = slots.depth_keep(depth, S)
    log_w = torch.where(keep, 0.0, model.cfg.log_floor).double()
    pos = slots.token_positions(B, T, None, "cpu")
    soft = model._pass(x, pos, log_w, None)
    hard = model._pass(x, pos, None, keep)
    diff = (soft - hard).abs().amax(-1)[keep]  # compare at the computed slots
    assert diff.max() < 1e-9


# ------------------------------------------------------------- invariant 5
@pytest.mark.parametrize("method", METHODS)
def test_hard_with_tiny_tau_equals_soft(method):
    model = tiny_model(method)
    ids = rand_ids(model)
    soft = model(ids, mode="soft", jacobi_iters=2)
    hard = model(ids, mode="hard", tau=1e-20, jacobi_iters=2)
    torch.testing.assert_close(soft.logits, hard.logits, atol=1e-12, rtol=0)
    exact = model(ids, mode="exact", tau=1e-20)
    assert (exact.depth == model.cfg.max_depth).all()


def test_hard_tau_to_zero_with_padding_equals_soft_on_unpadded():
    """Same invariant through the packed path: left padding forces gather/scatter."""
    model = tiny_model("ponderlm3")
    ids = rand_ids(model, B=1)
    soft = model(ids, mode="soft", jacobi_iters=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, T)], dim=1)
    hard = model(padded, mode="hard", tau=1e-20, jacobi_iters=3, attention_mask=mask)
    torch.testing.assert_close(hard.logits[:, 3:], soft.logits, atol=1e-12, rtol=0)
    assert (hard.logits[:, :3] == 0).all() and (hard.depth[:, :3] == 0).all()


# ------------------------------------------------------------- invariant 6
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["soft", "hard", "exact"])
def test_causality(method, mode):
    model = tiny_model(method)
    ids = rand_ids(model)
    kw = {} if mode == "soft" else {"tau": TAU_PRUNE}
    base = model(ids, mode=mode, **kw).logits
    for t in (0, 3, T - 2):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % model.cfg.vocab_size
        out = model(changed, mode=mode, **kw).logits
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} changed"
        assert not torch.equal(out[:, t + 1], base[:, t + 1])


# ------------------------------------------------------------- invariant 7
def test_router_gradient_through_mask_and_mixture():
    """The router runs once per pass: its last output only feeds the mixture, the earlier ones
    only feed the next pass's attention bias. Both must receive gradient (every pass
    backpropagated; tests/test_truncated_backprop.py covers the truncated default)."""
    model = tiny_model("ponderlm3", dtype=torch.float32, jacobi_grad_passes=0)
    outs = []

    def keep_output(module, inputs, output):
        output.retain_grad()
        outs.append(output)

    hook = model.router.register_forward_hook(keep_output)
    ids = rand_ids(model)
    out = model(ids, mode="soft", jacobi_iters=2)
    hook.remove()
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert len(outs) == 2 + 2 + 1  # K warm-up passes + J refinements + final pass
    mixture_grad = outs[-1].grad.abs().sum()
    mask_grads = [o.grad.abs().sum() for o in outs[:-1]]
    assert mixture_grad > 1e-6
    assert all(g > 1e-8 for g in mask_grads[1:])  # pass 1's router feeds pass 2's bias
    assert model.router.proj.weight.grad.abs().sum() > 0


def test_ponderlm3_with_onehot_router_is_ponderlm2():
    """s one-hot at K: the mixture and the mask reduce PonderLM-3 to PonderLM-2 exactly."""
    p3 = tiny_model("ponderlm3", seed=5)
    p2 = tiny_model("ponderlm2", seed=5)
    sd = {k: v for k, v in p3.state_dict().items() if not k.startswith("router.")}
    p2.load_state_dict(sd)
    with torch.no_grad():
        p3.router.proj.weight.zero_()
        p3.router.proj.bias.copy_(torch.tensor([-1e4, -1e4, 0.0]))
    ids = rand_ids(p3)
    a = p3(ids, mode="soft", jacobi_iters=2).logits
    b = p2(ids, mode="soft", jacobi_iters=2).logits
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
