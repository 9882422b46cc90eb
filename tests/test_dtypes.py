"""Mixed precision: every mode runs under bf16 autocast (the GPU training/inference setting) and
stays close to float32; gradients flow."""

import pytest
import torch

from conftest import METHODS, tiny_model


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_all_modes(method):
    model = tiny_model(method, dtype=torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    ref = {m: model(ids, mode=m, **({} if m == "soft" else {"tau": 1e-6})).logits for m in ("soft", "exact")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft = model(ids, mode="soft")
        exact = model(ids, mode="exact", tau=1e-6)
        hard = model(ids, mode="hard", tau=1e-6)
        gen = model.generate(ids, 3, tau=1e-6)
    assert soft.logits.dtype == torch.bfloat16
    assert exact.cache.k[0].dtype == torch.bfloat16  # the cache stores what the matmuls produce
    for got, want in ((soft.logits, ref["soft"]), (hard.logits, ref["soft"]), (exact.logits, ref["exact"])):
        assert (got.float() - want).abs().max() < 0.05
    assert gen.tokens.shape == (2, 12)
    soft.logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
