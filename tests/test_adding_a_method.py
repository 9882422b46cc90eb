"""docs/DESIGN.md, "Adding a method", proved: a method the code has never heard of is one row of
``METHOD_SPECS`` and nothing else. The row here - a looped transformer whose every round ends in
the final norm, "loop_normed" - exists only inside this test (we do not ship methods to prove a
point); with it registered, the model-wide invariant tests pass unchanged, and the model computes
the method's definition, written out by hand."""

import pytest
import torch

from ponderlm.model import config
from ponderlm.model.config import MethodSpec

import test_flops
import test_generate
import test_invariants
from conftest import tiny_model

NEW = "loop_normed"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(config.METHOD_SPECS, NEW, MethodSpec(round_input="residual", round_norm="every"))
    monkeypatch.setattr(config, "METHODS", (*config.METHODS, NEW))
    return monkeypatch


def test_a_spec_row_is_all_a_method_needs(registered):
    cfg = tiny_model(NEW).cfg  # the row alone gives the capabilities every module asks
    assert (cfg.n_rounds, cfg.n_latent, cfg.max_depth, cfg.round_ends_in_norm(False)) == (3, 0, 2, True)
    test_invariants.test_cached_exact_equals_full_recomputation(NEW)
    test_invariants.test_hard_with_tiny_tau_equals_soft(NEW)
    for mode in ("soft", "hard", "exact"):
        test_invariants.test_causality(NEW, mode)
    test_generate.test_greedy_generate_equals_repeated_exact(NEW, "token")
    test_generate.test_batched_left_padded_generate_equals_single_rows(NEW, "token")
    test_flops.test_inference_flops_match_executed_exact_recurrence(NEW, "linear", registered)
    test_flops.test_soft_forward_flops_match_executed(NEW, "staged", registered)


def test_the_new_method_computes_its_definition(registered):
    """norm(stack(x)) K+1 times with shared weights: not loop (norm only at the end)."""
    model = tiny_model(NEW, max_ponder_steps=2)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    x = model.embed(ids)
    pos = torch.arange(7).expand(2, -1)
    rope = model.rope(pos, x.dtype)
    for _ in range(3):
        for layer in model.layers:
            x = layer(x, rope, None)
        x = model.norm(x)
    want = model.lm_head(x)
    for mode in ("soft", "hard", "exact"):
        torch.testing.assert_close(model(ids, mode=mode).logits, want, atol=1e-12, rtol=0)
    loop = tiny_model("loop", max_ponder_steps=2)
    loop.load_state_dict(model.state_dict())
    assert not torch.allclose(loop(ids, mode="exact").logits, want)


def test_an_impossible_spec_is_refused():
    with pytest.raises(config.ConfigError, match="latent slots or rounds, not both"):
        MethodSpec(slot_input="hidden", round_input="residual")
    with pytest.raises(config.ConfigError, match="router chooses among latent-thought slots"):
        MethodSpec(round_input="residual", router=True)
