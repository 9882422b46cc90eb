"""Analytic FLOPs, counted as 2 x multiply-adds of the matmuls a method executes.

Counted: the q/k/v/o and SwiGLU projections of every computed slot, attention scores and
weighted values over the slot's *actual* causal context (pruned slots are not in it), the router
once per token per pass (PonderLM-3), and the vocabulary-sized matmuls: the LM head where logits
are needed (once per token; PonderLM-1 also needs them after every inner pass, plus the
``softmax(.) @ E`` of its soft-token feedback). Round methods (loop, PonderLM-1) compute K+1
slots per token, one per round, each attending to the same round of earlier tokens.
Not counted: norms, RoPE, softmax, activations, embedding lookups, the slot mixture -- all
elementwise and O(D) per slot, under 1% at any realistic size. Nor the implementation's
padding: the biased attention carries the bias in an extra head column (rounded up to 4 on
CPU, 8 on CUDA), so its scores, weighted values and output projection run on hd + 4 (or 8)
columns where the model needs hd; those are executed, not model, FLOPs (MFU counts model FLOPs).

Inference is the exact recurrence (what decoding executes); training is the soft Jacobi
computation (warm-up passes, J refinements and the final pass, every slot computed), forward and
backward counted as 3x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ponderlm.model.config import ModelConfig


def linear_flops_per_slot(cfg: ModelConfig) -> int:
    """Projection FLOPs of one slot through the whole stack."""
    D, hd = cfg.d_model, cfg.head_dim
    per_layer = D * cfg.n_heads * hd  # q
    per_layer += 2 * D * cfg.kv_heads * hd  # k, v
    per_layer += cfg.n_heads * hd * D  # o
    per_layer += 3 * D * cfg.d_ff  # gate, up, down
    return 2 * cfg.n_layers * per_layer


def attention_flops_per_key(cfg: ModelConfig) -> int:
    """FLOPs one query spends per visible key, over all layers (q.k and p.v)."""
    return 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim


def router_flops(cfg: ModelConfig) -> int:
    if not cfg.has_router:
        return 0
    S = cfg.max_ponder_steps + 1
    if cfg.router == "mlp":
        return 2 * (cfg.d_model * cfg.router_width + cfg.router_width * S)
    return 2 * cfg.d_model * S


def head_flops(cfg: ModelConfig) -> int:
    """Vocabulary-sized matmuls per token: the LM head, and for PonderLM-1 the head after each
    inner pass plus the soft-token feedback ``p @ E`` (each 2*D*V)."""
    return cfg.vocab_matmuls_per_token * 2 * cfg.d_model * cfg.vocab_size


@dataclass
class Flops:
    linear: float
    attention: float
    router: float
    head: float
    tokens: int

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.router + self.head

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)


def inference_flops(cfg: ModelConfig, depth: Tensor, token_mask: Tensor | None = None) -> Flops:
    """FLOPs of the exact recurrence over sequences with realised depths.

    Args: depth (B, T) or (T,) integer ponder steps per token (0 for vanilla, K for PonderLM-2);
    token_mask (B, T) marks real tokens (padding costs nothing).
    Token t computes 1 + d_t slots. Slot methods: slot (t, k) attends to every earlier kept slot
    and itself. Round methods: the slot of round r attends to round r of tokens <= t.
    """
    d = depth.long().reshape(-1, depth.shape[-1])  # (B, T)
    n = (1 + d).double()  # slots per token
    if token_mask is not None:
        n = n * token_mask.reshape(d.shape).double()
    if cfg.n_rounds > 1:
        real = n.gt(0).double()
        ctx = n * real.cumsum(-1)  # each round's slot sees that round's tokens 1..t
    else:
        prefix = n.cumsum(-1) - n  # slots before token t
        ctx = n * prefix + n * (n + 1) / 2  # sum over the token's slots of their context length
    tokens = int(n.gt(0).sum())
    return Flops(
        linear=float(linear_flops_per_slot(cfg) * n.sum()),
        attention=float(attention_flops_per_key(cfg) * ctx.sum()),
        router=float(router_flops(cfg) * tokens),
        head=float(head_flops(cfg) * tokens),
        tokens=tokens,
    )


def fixed_depth_inference_flops(cfg: ModelConfig, seq_len: int, depth: int | None = None) -> Flops:
    """Inference FLOPs with every token at one depth (default: the method's full depth)."""
    d = cfg.max_depth if depth is None else depth
    return inference_flops(cfg, torch.full((1, seq_len), d))


def forward_flops_soft(cfg: ModelConfig, seq_len: int, jacobi_iters: int, passes: slice = slice(None)) -> Flops:
    """FLOPs of one soft-mode forward over a sequence of seq_len tokens (of the ``passes`` given; the
    head belongs to the last pass)."""
    T = seq_len
    schedule = cfg.pass_schedule(jacobi_iters)  # the passes the model runs (ModelConfig.pass_schedule)
    lin = att = rout = 0.0
    for c in schedule[passes]:
        N = c * T
        lin += linear_flops_per_slot(cfg) * N
        att += attention_flops_per_key(cfg) * N * (N + 1) / 2
        rout += router_flops(cfg) * T
    has_last = len(schedule) - 1 in range(len(schedule))[passes]
    return Flops(linear=lin, attention=att, router=rout, head=float(head_flops(cfg) * T) if has_last else 0.0,
                 tokens=T)  # fmt: skip


def training_flops_per_token(cfg: ModelConfig, seq_len: int, jacobi_iters: float | None = None) -> float:
    """Forward + backward FLOPs per token, J averaged over the training range: 3x the forward of the
    passes that are backpropagated, 1x the forward of those run without autograd
    (``jacobi_grad_passes``)."""
    if jacobi_iters is None:
        Js = cfg.jacobi_train_iters
        return sum(training_flops_per_token(cfg, seq_len, j) for j in Js) / len(Js)
    J = int(jacobi_iters)
    n = cfg.jacobi_grad_passes if cfg.uses_jacobi else 0
    if not n:
        return 3.0 * forward_flops_soft(cfg, seq_len, J).per_token
    split = len(cfg.pass_schedule(J)) - n
    no_grad = forward_flops_soft(cfg, seq_len, J, slice(None, split)).per_token if split > 0 else 0.0
    return no_grad + 3.0 * forward_flops_soft(cfg, seq_len, J, slice(max(split, 0), None)).per_token
