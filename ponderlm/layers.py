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

from .config import ModelConfig

if TYPE_CHECKING:
    from .cache import KVCache


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


def biased_causal_attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None) -> Tensor:
    """Causal attention with an additive per-key bias, inside fused SDPA.

    The bias rides in an extra head dimension: q' = [q * scale, 1], k' = [k, bias], so
    q'.k' = scale * q.k + bias_j. Dims are padded to a multiple of 8 (v with zeros) and SDPA
    runs with scale 1 and is_causal=True; no (L, L) mask is ever built.

    Args: q (B, H, L, hd); k, v (B, Hkv, L, hd); key_bias (B, L) or None.
    Returns: (B, H, L, hd).
    """
    gqa = q.shape[1] != k.shape[1]
    if key_bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    B, H, L, hd = q.shape
    pad = (-(hd + 1)) % 8
    scale = hd**-0.5
    one = q.new_ones(B, H, L, 1)
    qa = F.pad(torch.cat([q * scale, one], dim=-1), (0, pad))  # (B, H, L, hd+1+pad)
    kb = key_bias.to(k.dtype)[:, None, :, None].expand(B, k.shape[1], L, 1)
    ka = F.pad(torch.cat([k, kb], dim=-1), (0, pad))  # (B, Hkv, L, hd+1+pad)
    va = F.pad(v, (0, 1 + pad))  # (B, Hkv, L, hd+1+pad)
    out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=1.0, enable_gqa=gqa)
    return out[..., :hd]


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
        if past is None:  # no cache, or an empty one: plain causal attention over the new slots
            out = biased_causal_attention(q, k, v, key_bias)
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
