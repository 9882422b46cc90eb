"""Batched generation: prefill, then decode token by token with hard pruning and a KV cache.

Rows may take different depths at the same step; each row's cache holds only the slots it
actually computed (see ``ponderlm.cache``). Prompts of different lengths are left-padded with an
``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .config import check_tau
from .slots import token_positions

if TYPE_CHECKING:
    from .model import PonderLM


@dataclass
class GenerateOutput:
    tokens: Tensor  # (B, T + N) prompt followed by the generated tokens
    depth: Tensor  # (B, N) ponder steps spent to produce each generated token (0 after EOS)
    prompt_depth: Tensor  # (B, T) realised ponder steps at each prompt position
    cache_entries: Tensor  # (B,) slots held in the KV cache at the end


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token per row from logits (B, V): greedy at temperature 0. Returns (B,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PonderLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    tau: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    prefill: Literal["auto", "exact", "parallel"] = "auto",
    jacobi_iters: int | None = None,
    on_token: Callable[[Tensor, Tensor], None] | None = None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per row.

    Args:
        input_ids: (B, T) prompts, left-padded when ``attention_mask`` marks padding with 0.
        tau: pruning threshold (default cfg.tau).
        temperature/top_k/top_p/seed: sampling; temperature 0 is greedy.
        eos_token_id: rows stop at this token and are filled with it afterwards; generation
            ends early once every row has stopped.
        prefill: "exact" runs the prompt through the sequential recurrence (the reference);
            "parallel" uses the hard-pruned Jacobi passes and fills the cache from the final
            pass (fast; equal to exact once Jacobi has converged); "auto" is parallel for
            methods without latent feedback (where the two coincide) and exact otherwise.
        on_token: called with (tokens (B,), depths (B,)) as each token is chosen (streaming).
    """
    cfg = model.cfg
    model._check_ids(input_ids)
    tau = check_tau(cfg.tau if tau is None else tau)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("generate needs a non-empty prompt")
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {cfg.max_seq_len}")
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        if not bool(mask[:, -1].all()):
            raise ValueError("generate expects left padding: the last prompt column must be real tokens")
    if prefill == "auto":
        prefill = "exact" if cfg.uses_jacobi else "parallel"
    if prefill not in ("exact", "parallel"):
        raise ValueError(f"prefill must be 'auto', 'exact' or 'parallel', got {prefill!r}")

    S = cfg.slots_per_token
    cache = model.new_cache(B, capacity=(T + max_new_tokens) * S)
    if prefill == "exact":
        e = model.embed(input_ids)
        pos = token_positions(B, T, mask, e.device)
        active = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=e.device)
        h_last = depth_last = None
        pdepth = []
        for t in range(T):
            h_last, depth_last, _, _ = model.ponder_token(e[:, t], pos[:, t], active[:, t], cache, tau)
            pdepth.append(depth_last)
        prompt_depth = torch.stack(pdepth, dim=1)
    else:
        J = cfg.jacobi_iters if jacobi_iters is None else jacobi_iters
        out = model._parallel(input_ids, "hard", tau, J, mask, cache)
        h_last = out.hidden[:, -1]
        prompt_depth = out.depth.long()
        depth_last = prompt_depth[:, -1]

    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    next_pos = (mask.sum(-1) if mask is not None else torch.full((B,), T, device=input_ids.device)).long()
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, depths = [], []
    for i in range(max_new_tokens):
        logits = model.lm_head(h_last)  # (B, V)
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(finished, eos_token_id)
        tokens.append(nxt)
        depths.append(depth_last.masked_fill(finished, 0))
        if on_token is not None:
            on_token(nxt, depths[-1])
        if eos_token_id is not None:
            finished = finished | (nxt == eos_token_id)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        h_last, depth_last, _, _ = model.ponder_token(model.embed(nxt), next_pos, ~finished, cache, tau)
        next_pos = next_pos + (~finished).long()

    new = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(B, 0)
    dep = torch.stack(depths, 1) if depths else input_ids.new_zeros(B, 0)
    return GenerateOutput(
        tokens=torch.cat([input_ids, new], dim=1),
        depth=dep,
        prompt_depth=prompt_depth,
        cache_entries=cache.num_entries(),
    )
