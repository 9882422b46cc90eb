"""Shared tiny-model fixtures: every test runs on CPU in well under a second per model."""

from __future__ import annotations

import pytest
import torch

from ponderlm import ModelConfig, PonderLM

METHODS = ["vanilla", "pause", "loop", "ponderlm1", "ponderlm2", "ponderlm3"]


def tiny_config(method: str = "ponderlm3", **overrides) -> ModelConfig:
    """A ~20k-parameter config with GQA (4 query heads, 2 kv heads) and K=2."""
    base = dict(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=64,
        method=method,
        max_ponder_steps=2,
        router_init_bias=0.0,  # spread router distribution: pruning at tau ~ 0.4 varies by token
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(method: str = "ponderlm3", seed: int = 0, dtype=torch.float64, **overrides) -> PonderLM:
    torch.manual_seed(seed)
    return PonderLM(tiny_config(method, **overrides)).to(dtype).eval()


def dense_slot_bias(key_bias: torch.Tensor) -> torch.Tensor:
    """Reference (B, N, N) additive mask for the soft path: causal plus a per-key bias. The model
    never materialises this matrix; tests compare against it."""
    B, N = key_bias.shape
    causal = torch.ones(N, N, dtype=torch.bool, device=key_bias.device).tril()
    bias = key_bias.unsqueeze(1).expand(B, N, N)
    return bias.masked_fill(~causal, float("-inf"))


def converged_iters(T: int, K: int) -> int:
    """Jacobi on the causal slot graph is exact after (longest dependency chain) iterations."""
    return T * K + 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
