"""Llama-style building blocks: RMSNorm, RoPE, GQA attention with an optional per-key bias and
KV cache, SwiGLU, and the pre-norm Block.

Parameter names follow transformers' Llama (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``...) so weights map one-to-one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ponderlm.model.config import ModelConfig

if TYPE_CHECKING:
    from ponderlm.model.cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # statistics in >= float32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (as transformers' Llama).

    The cos/sin tables are computed in float64 and kept out of the state dict and out of
    ``module.to(dtype)``: a bf16 model still rotates with float32 angles, a float64 model with
    float64 ones.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: dict = {}  # built on first use, on the CPU even when the module is built on "meta"

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, dtype)
        if key not in self._tables:
            if torch.float64 not in self._tables:
                hd, cpu = self.head_dim, torch.device("cpu")
                inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=cpu) / hd))
                pos = torch.arange(self.max_seq_len, dtype=torch.float64, device=cpu)
                freqs = torch.outer(pos, inv_freq)  # (P, hd/2)
                emb = torch.cat([freqs, freqs], dim=-1)  # (P, hd)
                self._tables[torch.float64] = (emb.cos(), emb.sin())
            cos, sin = self._tables[torch.float64]
            self._tables[key] = (cos.to(device, dtype), sin.to(device, dtype))
        return self._tables[key]

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, L) long -> cos, sin (B, 1, L, hd), float64 for float64 models else float32."""
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.max_seq_len}")
        cos, sin = self._table(positions.device, dtype)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


def augmented_head_dim(head_dim: int, device: torch.device) -> int:
    """Head dimension that carries the bias column: hd + 1 rounded up to a multiple of 8 on CUDA
    (the fused kernels' requirement) and of 4 on CPU. The CPU flash kernel takes any size, but
    with an odd one its float64 results change in the last bit with the sequence length (seen in
    the bitwise causality test of hard mode); multiples of 4 keep them exact, at 68/64 the
    memory for hd = 64 where 72/64 would be needed for 8."""
    return head_dim + 1 + (-(head_dim + 1)) % (8 if device.type == "cuda" else 4)


def _augment(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """q' = [q, sqrt(hd), 0..], k' = [k, bias, 0..], v' = [v, 0..], each (., ., L, width), so that
    hd**-0.5 * q'.k' = hd**-0.5 * q.k + bias_j. Written into fresh buffers (one copy each)."""
    B, _, L, hd = q.shape

    def buffer(x: Tensor, extra: Tensor | float | None) -> Tensor:  # each element written once
        out = x.new_empty(B, L, x.shape[1], width).transpose(1, 2)  # (B, L, H, .) in memory, as the projections
        out[..., :hd] = x
        first_pad = hd
        if extra is not None:
            out[..., hd] = extra
            first_pad += 1
        out[..., first_pad:] = 0
        return out

    qa = buffer(q, hd**0.5)
    ka = buffer(k, key_bias.to(k.dtype)[:, None, :])
    va = buffer(v, None)
    return qa, ka, va


class _BiasedAttention(torch.autograd.Function):
    """Fused causal SDPA on the augmented q', k', v'; keeps only the augmented tensors for backward.

    Autograd through the plain-op version would keep both q, k, v and their augmented copies alive
    (and allocate a scaled copy of dq); here the un-augmented inputs are released after forward, the
    bias gradient is the bias column of dk', and dq, dk, dv are views of the augmented gradients.
    The output is the kernel's whole (B, H, L, width) tensor, so the gradient arrives in that shape
    with no zero-padded copy (its columns past hd are zero: the output does not depend on them).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, width: int) -> Tensor:
        hd = q.shape[-1]
        gqa = q.shape[1] != k.shape[1]
        qa, ka, va = _augment(q.detach(), k.detach(), v.detach(), key_bias.detach(), width)
        if not any(ctx.needs_input_grad[:4]):
            return F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=hd**-0.5, enable_gqa=gqa)
        with torch.enable_grad():
            qa.requires_grad_(), ka.requires_grad_(), va.requires_grad_()
            out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=hd**-0.5, enable_gqa=gqa)
        ctx.save_for_backward(qa, ka, va, out)
        ctx.hd = hd
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        qa, ka, va, out = ctx.saved_tensors
        hd = ctx.hd
        if grad.stride() != out.stride():  # the kernel wants grad laid out as out, or it copies
            grad = torch.empty_like(out).copy_(grad)
        dq, dk, dv = torch.autograd.grad(out, (qa, ka, va), grad)
        dbias = dk[..., hd].sum(1) if ctx.needs_input_grad[3] else None  # (B, L): summed over kv heads
        return dq[..., :hd], dk[..., :hd], dv[..., :hd], dbias, None


def biased_causal_attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, padded: bool = False) -> Tensor:
    """Causal attention with an additive per-key bias, inside fused SDPA.

    The bias rides in an extra head dimension: q' = [q, sqrt(hd)], k' = [k, bias], v' = [v, 0],
    so hd**-0.5 * q'.k' = hd**-0.5 * q.k + bias_j, and SDPA runs with is_causal=True: no (L, L)
    mask is ever built. See ``_BiasedAttention`` for what is kept for backward.

    Args: q (B, H, L, hd); k, v (B, Hkv, L, hd); key_bias (B, L) or None. ``padded``: return the
      kernel's (B, H, L, width) output as is (its columns past hd are exactly zero, since v' is
      zero there), so a caller can read it without the copy a slice would cost; see
      ``Attention.forward``.
    Returns: (B, H, L, hd), or (B, H, L, width) with ``padded`` and a bias.
    """
    gqa = q.shape[1] != k.shape[1]
    if key_bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out = _BiasedAttention.apply(q, k, v, key_bias, augmented_head_dim(q.shape[-1], q.device))
    return out if padded else out[..., : q.shape[-1]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        key_bias: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, L, D); key_bias (B, L) additive bias of each new key; returns (B, L, D)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = cache.update(self.layer_idx, k, v) if cache is not None else None
        if past is None:  # no cache, or an empty one: causal attention over the new slots
            out = biased_causal_attention(q, k, v, key_bias, padded=True)  # (B, H, L, >= hd)
            if out.shape[-1] != self.head_dim:  # padded heads: zero columns meet zero weights
                # (o_proj's weight is used directly here, so forward hooks on o_proj do not run)
                pad = out.shape[-1] - self.head_dim
                w = F.pad(self.o_proj.weight.view(-1, self.n_heads, self.head_dim), (0, pad)).flatten(1)
                return F.linear(out.transpose(1, 2).reshape(B, L, -1), w)
        else:  # attend to the cached prefix of each row: small (B, 1, L, used) mask
            k_all, v_all, mask = past
            out = F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        key_bias: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, key_bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
