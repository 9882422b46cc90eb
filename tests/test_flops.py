"""Analytic FLOPs equal a direct count of what the model executes."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ponderlm.model import flops

from conftest import METHODS, tiny_config, tiny_model


class AttentionCounter:
    """Wraps SDPA and counts the (query, key) pairs each call actually attends to."""

    def __init__(self, monkeypatch, head_dim, n_heads):
        self.pairs_x_heads = 0
        self.n_heads = n_heads
        self.head_dim = head_dim
        real = F.scaled_dot_product_attention

        def counting(q, k, v, attn_mask=None, is_causal=False, **kw):
            B, H, Lq, _ = q.shape
            Lk = k.shape[2]
            if attn_mask is not None:
                visible = torch.isfinite(attn_mask).expand(B, 1, Lq, Lk).sum()
                self.pairs_x_heads += int(visible) * H
            elif is_causal:
                assert Lq == Lk
                self.pairs_x_heads += B * H * Lq * (Lq + 1) // 2
            else:
                self.pairs_x_heads += B * H * Lq * Lk
            return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

        monkeypatch.setattr("ponderlm.model.layers.F.scaled_dot_product_attention", counting)

        # The biased path feeds the output projection its padded heads (zero columns times zero
        # weights, see layers.Attention): executed work beyond the model's FLOPs, counted apart.
        self.padding_flops = 0
        linear = F.linear

        def counting_linear(x, w, b=None):
            if not isinstance(w, torch.nn.Parameter):  # the padded o_proj weight, built per call
                assert w.shape[1] > self.n_heads * self.head_dim
                self.padding_flops += 2 * x[..., 0].numel() * w.shape[0] * (w.shape[1] - self.n_heads * head_dim)
            return linear(x, w, b)

        monkeypatch.setattr("ponderlm.model.layers.F.linear", counting_linear)

    @property
    def flops(self):
        return 4 * self.pairs_x_heads * self.head_dim  # q.k and p.v, 2 FLOPs per MAC


def matmul_flops(fc):
    c = fc.get_flop_counts()["Global"]
    return sum(v for k, v in c.items() if str(k) in ("aten.mm", "aten.addmm"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("router", ["linear", "mlp"])
def test_inference_flops_match_executed_exact_recurrence(method, router, monkeypatch):
    model = tiny_model(method, router=router, n_layers=3)
    counter = AttentionCounter(monkeypatch, model.cfg.head_dim, model.cfg.n_heads)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 11))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(ids, mode="exact", tau=0.4)
    got = flops.inference_flops(model.cfg, out.depth)
    assert got.tokens == 11
    assert matmul_flops(fc) == got.linear + got.router + got.head + counter.padding_flops
    assert counter.flops == got.attention
    if method == "ponderlm3":
        assert out.depth.min() < 2, "want pruning to exercise the realised-depth accounting"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("warmup", ["staged", "zeros"])
def test_soft_forward_flops_match_executed(method, warmup, monkeypatch):
    model = tiny_model(method, jacobi_warmup=warmup)
    counter = AttentionCounter(monkeypatch, model.cfg.head_dim, model.cfg.n_heads)
    B, T, J = 2, 9, 2
    ids = torch.randint(0, model.cfg.vocab_size, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, mode="soft", jacobi_iters=J)
    got = flops.forward_flops_soft(model.cfg, T, J)
    assert matmul_flops(fc) == B * (got.linear + got.router + got.head) + counter.padding_flops
    assert counter.flops == B * got.attention
    if method == "ponderlm3":  # the bias path ran, and its padding is a small fraction
        assert 0 < counter.padding_flops < 0.1 * B * got.linear


def test_pruning_reduces_inference_flops_monotonically():
    cfg = tiny_model("ponderlm3").cfg
    T = 32
    per_depth = [flops.fixed_depth_inference_flops(cfg, T, d).per_token for d in range(3)]
    assert per_depth[0] < per_depth[1] < per_depth[2]
    vanilla = flops.fixed_depth_inference_flops(cfg.replace(method="vanilla"), T).per_token
    p2 = flops.fixed_depth_inference_flops(cfg.replace(method="ponderlm2"), T).per_token
    # depth 0 of PonderLM-3 costs vanilla plus the router; full depth costs PonderLM-2 plus it
    assert per_depth[0] == vanilla + flops.router_flops(cfg)
    assert per_depth[2] == p2 + flops.router_flops(cfg)


def test_padding_costs_nothing_and_training_is_3x_forward():
    cfg = tiny_model("ponderlm2", jacobi_grad_passes=0).cfg  # every pass backpropagated
    d = torch.full((1, 6), 2)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    padded = flops.inference_flops(cfg, d, mask)
    plain = flops.inference_flops(cfg, torch.full((1, 4), 2))
    assert padded.total == plain.total and padded.tokens == 4
    fwd = flops.forward_flops_soft(cfg, 16, 3).per_token
    assert flops.training_flops_per_token(cfg, 16, 3) == 3 * fwd
    two, three = (flops.training_flops_per_token(cfg, 16, j) for j in (2, 3))
    assert flops.training_flops_per_token(cfg, 16) == pytest.approx((two + three) / 2)


def test_truncated_backprop_counts_the_passes_it_differentiates():
    """With jacobi_grad_passes=n the passes before the last n are forward only (1x), the last n
    forward and backward (3x); n >= the number of passes is the full count."""
    cfg = tiny_config("ponderlm3", max_ponder_steps=3, jacobi_grad_passes=0)
    T, J = 16, 3
    per_pass = [flops.forward_flops_soft(cfg, T, J, slice(p, p + 1)).per_token for p in range(7)]
    assert abs(sum(per_pass) - flops.forward_flops_soft(cfg, T, J).per_token) < 1e-6
    for n in (1, 2, 7):
        got = flops.training_flops_per_token(cfg.replace(jacobi_grad_passes=n), T, J)
        assert abs(got - (sum(per_pass[: 7 - n]) + 3 * sum(per_pass[7 - n :]))) < 1e-6
    assert abs(flops.training_flops_per_token(cfg.replace(jacobi_grad_passes=7), T, J)
               - flops.training_flops_per_token(cfg, T, J)) < 1e-6  # fmt: skip
