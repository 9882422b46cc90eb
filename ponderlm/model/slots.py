"""Slot layout: pure functions, no state.

Each token t owns S = K+1 slots (t,0) (the token itself) and (t,1..K) (latent thoughts), laid
out interleaved, token-major: ``x_1, z_1^1..z_1^K, x_2, ...``. Every slot of token t has RoPE
position t, so plain causal attention over this order is exactly the PonderLM dependency
structure: slot (t,k) sees all slots of earlier tokens and (t,0..k).

Pruned slots (hard mode) are *removed*: `pack_slots` gathers the kept slots of each row to the
front, in order, and pads the tail; causal attention never lets a real slot see the padding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def interleave(x: Tensor) -> Tensor:
    """(B, T, S, ...) -> (B, T*S, ...): token-major slot order."""
    B, T, S = x.shape[:3]
    return x.reshape(B, T * S, *x.shape[3:])


def deinterleave(x: Tensor, slots: int) -> Tensor:
    """(B, T*S, ...) -> (B, T, S, ...)."""
    B, N = x.shape[:2]
    if N % slots:
        raise ValueError(f"length {N} is not a multiple of slots per token {slots}")
    return x.reshape(B, N // slots, slots, *x.shape[2:])


def token_positions(batch: int, seq_len: int, token_mask: Tensor | None, device) -> Tensor:
    """RoPE position of every token, (B, T). With a left-padding mask, real tokens count from 0."""
    if token_mask is None:
        return torch.arange(seq_len, device=device).expand(batch, seq_len)
    return (token_mask.long().cumsum(-1) - 1).clamp_min(0)


def slot_positions(tok_pos: Tensor, slots: int) -> Tensor:
    """(B, T) token positions -> (B, T, S): every slot shares its token's position."""
    return tok_pos.unsqueeze(-1).expand(*tok_pos.shape, slots)


def depth_keep(depth: Tensor, slots: int, token_mask: Tensor | None = None) -> Tensor:
    """Which slots are computed: (t, k) is kept iff k <= depth_t (and t is not padding).

    Args: depth (B, T) long, realised ponder steps; slots S. Returns (B, T, S) bool.
    """
    k = torch.arange(slots, device=depth.device)
    keep = k <= depth.unsqueeze(-1)  # (B, T, S)
    if token_mask is not None:
        keep = keep & token_mask.bool().unsqueeze(-1)
    return keep


def prune_depth(log_reach: Tensor, tau: float) -> Tensor:
    """Hard pruning rule: K_hat_t = max{k : w_{t,k} >= tau}.

    Args: log_reach (B, T, K+1), log w with log w_0 = 0. Returns (B, T) long.
    The cumulative product enforces the prefix property even if rounding broke monotonicity.
    """
    ok = log_reach[..., 1:] >= math.log(tau)  # (B, T, K)
    return ok.long().cumprod(-1).sum(-1)


def pack_slots(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices that gather the kept slots of each row to the front, in order.

    Args: keep (B, N) bool. Returns (index (B, L) long, lengths (B,) long), L = max kept count.
    index[b, :lengths[b]] are the kept positions in order; the tail points at distinct
    unkept positions (harmless padding: it sits after every real slot).
    """
    lengths = keep.sum(-1)
    L = int(lengths.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept first, in order
    return order[:, :L], lengths


def gather_slots(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) -> (B, L, ...) at index (B, L)."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def scatter_slots(packed: Tensor, index: Tensor, keep: Tensor) -> Tensor:
    """Inverse of gather_slots: (B, L, ...) -> (B, N, ...), zeros where keep is False."""
    B, N = keep.shape
    out = packed.new_zeros(B, N, *packed.shape[2:])
    idx = index.view(*index.shape, *([1] * (packed.dim() - 2))).expand_as(packed)
    out = out.scatter(1, idx, packed)
    mask = keep.view(B, N, *([1] * (packed.dim() - 2)))
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
