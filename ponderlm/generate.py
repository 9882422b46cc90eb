"""Batched generation: prefill, then decode with hard pruning and a KV cache.

Rows may take different depths; each row's cache holds only the slots it actually computed (see
``ponderlm.cache``). Prompts of different lengths are left-padded with an ``attention_mask``.

Two schedules give the same tokens (greedy; sampling draws in another order):

* ``token``: all rows advance one token per step; a step runs latent slot k for the whole batch
  while any row needs it (rows that stopped earlier are masked), so a batch pays for its deepest
  token at every step.
* ``slot``: every model call advances each row by one slot of its own -- the next latent slot of
  its current token, or the token slot of its next token (from the prompt, or sampled as soon as
  the row's pondering ends). No row waits for another, so the number of calls follows the
  realised depths: about N * (1 + mean depth) instead of N * (1 + deepest depth per step).
  Each call carries some bookkeeping and, for the rows that just finished a token, a vocabulary
  matmul, so the schedule pays once the stack dominates (benchmarks/inference.py: 1.1x the token
  schedule's speed at d=256, 1.4x at d=512 on CPU; slower at toy sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .config import check_tau
from .slots import depth_keep, prune_depth, token_positions

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
    schedule: Literal["auto", "token", "slot"] = "auto",
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
        on_token: called with (tokens (B,), depths (B,)) as each token is chosen (streaming;
            token schedule only).
        schedule: "token" or "slot" (see the module docstring); "auto" is slot for a router
            model (PonderLM-3) with more than one row and no on_token, else token. Round
            methods (loop, PonderLM-1) always use the token schedule.
    """
    cfg = model.cfg
    model._check_ids(input_ids)
    tau = check_tau(cfg.tau if tau is None else tau)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed}")
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

    if schedule == "auto":
        schedule = "slot" if cfg.has_router and B > 1 and on_token is None else "token"
    if schedule not in ("token", "slot"):
        raise ValueError(f"schedule must be 'auto', 'token' or 'slot', got {schedule!r}")
    if schedule == "slot" and (on_token is not None or cfg.n_rounds > 1):
        why = "streaming (on_token)" if on_token is not None else f"method {cfg.method!r} (one cache per round)"
        raise ValueError(f"schedule='slot' does not support {why}; use schedule='token'")

    S = cfg.slots_per_token
    cache = model.new_cache(B, capacity=(T + max_new_tokens) * S)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)

    def pick(logits: Tensor) -> Tensor:
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)

    if schedule == "slot":
        last = None
        if prefill == "parallel":
            J = cfg.jacobi_iters if jacobi_iters is None else jacobi_iters
            out = model._parallel(input_ids, "hard", tau, J, mask, cache)
            last = (out.hidden[:, -1], out.depth.long())
        return _generate_by_slot(model, cache, input_ids, mask, max_new_tokens, tau, pick, eos_token_id, last)

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

    next_pos = (mask.sum(-1) if mask is not None else torch.full((B,), T, device=input_ids.device)).long()
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, depths = [], []
    for i in range(max_new_tokens):
        logits = model.lm_head(h_last)  # (B, V)
        nxt = pick(logits)
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


def _generate_by_slot(
    model: PonderLM,
    cache,
    input_ids: Tensor,
    mask: Tensor | None,
    max_new_tokens: int,
    tau: float,
    pick: Callable[[Tensor], Tensor],
    eos_token_id: int | None,
    prefilled: tuple[Tensor, Tensor] | None,
) -> GenerateOutput:
    """The slot schedule: each call of the stack advances every running row by one slot.

    A row walks through its prompt's real tokens (teacher-forced, unless ``prefilled`` holds the
    last prompt hidden state and the prompt depths from a parallel prefill), then through the
    tokens it samples. Per row the slots, their inputs, positions, key biases and cache entries
    are those of ``PonderLM.ponder_token`` in the same order, so its results are the exact
    recurrence's. Per-row state: ``col`` (prompt column of the token being pondered; >= T once
    generating), ``stage`` (the slot it computes next: 0 token slot, k latent slot k),
    ``depth`` (its token's realised depth, known after the token slot) and the token's slot
    hidden states ``hs`` and router outputs.
    """
    cfg = model.cfg
    K, N = cfg.n_latent, max_new_tokens
    B, T = input_ids.shape
    dev = input_ids.device
    rows = torch.arange(B, device=dev)
    real = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    fill = eos_token_id if eos_token_id is not None else 0
    tokens = torch.full((B, N), fill, dtype=input_ids.dtype, device=dev)  # filler after EOS
    depths = torch.zeros(B, N, dtype=torch.long, device=dev)
    n_gen = torch.zeros(B, dtype=torch.long, device=dev)  # tokens emitted per row
    finished = torch.zeros(B, dtype=torch.bool, device=dev)  # emitted EOS
    dtype = model.embed_tokens.weight.dtype
    hs = torch.zeros(B, K + 1, cfg.d_model, dtype=dtype, device=dev)  # slot hiddens of each row's current token
    probs = torch.zeros(B, K + 1, dtype=dtype, device=dev)
    log_w = torch.zeros(B, K + 1, dtype=dtype, device=dev)  # log w_0 = 0: the token slot's bias
    depth = torch.full((B,), K, dtype=torch.long, device=dev)  # router-free methods: always K
    stage = torch.zeros(B, dtype=torch.long, device=dev)
    pause = model.pause_inputs().to(dtype) if model.pause_embed is not None else None

    def emit(idx: Tensor, h_hat: Tensor, d: Tensor) -> Tensor:
        """Rows idx finished pondering the token that produces output n_gen: sample it. -> (n,)."""
        j = n_gen[idx]
        nxt = pick(model.lm_head(h_hat))
        tokens[idx, j] = nxt
        depths[idx, j] = d
        if eos_token_id is not None:
            finished[idx] |= nxt == eos_token_id
        n_gen[idx] += 1
        return nxt

    if prefilled is not None:  # the cache holds the prompt; its last hidden state gives token 0
        h_last, prompt_depth = prefilled
        col = torch.full((B,), T, dtype=torch.long, device=dev)
        pos = real.sum(-1).long()
        nxt = emit(rows, h_last, prompt_depth[:, -1]) if N > 0 else input_ids[:, -1]
        running = ~finished & (n_gen < N)
    else:
        prompt_depth = torch.zeros(B, T, dtype=torch.long, device=dev)
        col = (~real).sum(-1).long()  # first real column (left padding)
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        nxt = input_ids[rows, col]
        running = torch.ones(B, dtype=torch.bool, device=dev)
    x = model.embed(nxt)  # (B, D) next slot input of each row
    while bool(running.any()):
        bias = log_w.gather(1, stage.unsqueeze(1)) if model.router is not None else None  # (B, 1)
        h = model.stack(x.unsqueeze(1), pos.unsqueeze(1), bias, cache, running.long())[:, 0]  # (B, D)
        first = stage == 0
        if model.router is not None and bool((first & running).any()):
            p, lw = model.route(h)  # (B, K+1) each
            probs = torch.where(first.unsqueeze(1), p, probs)
            log_w = torch.where(first.unsqueeze(1), lw, log_w)
            depth = torch.where(first, prune_depth(lw.unsqueeze(1), tau)[:, 0], depth)
        hs[rows, stage] = h
        done = running & (stage == depth)  # rows whose token's pondering ends with this slot
        # the rest go on to their next latent slot
        stage = torch.where(running & ~done, stage + 1, stage)
        if pause is not None:
            x = torch.where((running & ~done).unsqueeze(1), pause[(stage - 1).clamp_min(0)], x)
        else:
            x = torch.where((running & ~done).unsqueeze(1), h, x)
        if not bool(done.any()):
            continue
        idx = done.nonzero().squeeze(1)  # (n,)
        keep = depth_keep(depth[idx].unsqueeze(1), K + 1)  # (n, 1, K+1)
        wts = probs[idx].unsqueeze(1) if model.router is not None else None
        h_hat = model.mix(hs[idx].unsqueeze(1), wts, keep)[:, 0]  # (n, D)
        d, c = depth[idx], col[idx]
        in_prompt = c < T
        prompt_depth[idx[in_prompt], c[in_prompt]] = d[in_prompt]
        c = c + 1
        col[idx], stage[idx], pos[idx] = c, 0, pos[idx] + 1
        new = input_ids[idx, c.clamp(max=T - 1)]  # teacher-forced: the next prompt token
        sample = (c >= T) & (n_gen[idx] < N)  # pondered the last prompt token or a generated one
        if bool(sample.any()):
            new[sample] = emit(idx[sample], h_hat[sample], d[sample])
        x[idx] = model.embed(new)
        running = running & ~finished & ~((col >= T) & (n_gen >= N))
    width = int(n_gen.max()) if N > 0 else 0
    return GenerateOutput(
        tokens=torch.cat([input_ids, tokens[:, :width]], dim=1),
        depth=depths[:, :width],
        prompt_depth=prompt_depth,
        cache_entries=cache.num_entries(),
    )
