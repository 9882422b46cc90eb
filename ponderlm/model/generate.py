"""Batched generation: prefill, then decode with hard pruning and a KV cache.

Rows may take different depths; each row's cache holds only the slots it actually computed (see
``ponderlm.model.cache``). Prompts of different lengths are left-padded with an ``attention_mask``.
The slots themselves are the exact recurrence (``ponderlm.model.recurrence``); this module holds
sampling and the two decoding schedules built on it.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ponderlm.model import recurrence
from ponderlm.model.config import check_tau

if TYPE_CHECKING:
    from ponderlm.model.model import PonderLM, PonderOutput


@dataclass
class GenerateOutput:
    tokens: Tensor  # (B, T + N) prompt followed by the generated tokens
    depth: Tensor  # (B, N) ponder steps spent to produce each generated token (0 after EOS)
    prompt_depth: Tensor  # (B, T) realised ponder steps at each prompt position
    cache_entries: Tensor  # (B,) slots held in the KV cache at the end


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature is a finite number >= 0, top_k None or an integer >= 1 and
    top_p None or a finite number in (0, 1]: a NaN or an infinity would otherwise surface as a
    RuntimeError deep inside torch (or, for temperature inf, as silently uniform sampling)."""
    if not (_finite_number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (_finite_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a finite number in (0, 1], got {top_p!r}")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token per row from logits (B, V): greedy at temperature 0. Returns (B,)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Options:
    """generate's arguments, checked and resolved (defaults from the model's config)."""

    tau: float
    prefill: str  # "exact" | "parallel"
    schedule: str  # "token" | "slot"
    jacobi_iters: int | None
    mask: Tensor | None  # (B, T) bool, left padding


def _resolve(
    model: PonderLM,
    input_ids: Tensor,
    max_new_tokens: int,
    attention_mask: Tensor | None,
    tau: float | None,
    seed: int | None,
    prefill: str,
    schedule: str,
    streaming: bool,
    jacobi_iters: int | None,
) -> _Options:
    cfg = model.cfg
    model.check_input_ids(input_ids)
    tau = check_tau(cfg.tau if tau is None else tau)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed}")
    B, T = input_ids.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {cfg.max_seq_len}")
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        if not bool(mask[:, -1].all()):
            raise ValueError("generate expects left padding: the last prompt column must be real tokens")
    if schedule == "auto":
        schedule = "slot" if cfg.has_router and B > 1 and not streaming else "token"
    if schedule not in ("token", "slot"):
        raise ValueError(f"schedule must be 'auto', 'token' or 'slot', got {schedule!r}")
    if schedule == "slot" and (streaming or cfg.n_rounds > 1):
        why = "streaming (on_token)" if streaming else f"method {cfg.method!r} (one cache per round)"
        raise ValueError(f"schedule='slot' does not support {why}; use schedule='token'")
    return _Options(tau, recurrence.resolve_prefill(model, prefill), schedule, jacobi_iters, mask)


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
    prefill: Literal["auto", "exact", "parallel", "converged"] = "auto",
    jacobi_iters: int | None = None,
    on_token: Callable[[Tensor, Tensor], None] | None = None,
    schedule: Literal["auto", "token", "slot"] = "auto",
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per row.

    Args:
        input_ids: (B, T) prompts, left-padded when ``attention_mask`` marks padding with 0.
        tau: pruning threshold (default cfg.tau). temperature/top_k/top_p/seed: sampling
            (temperature 0 is greedy). eos_token_id: rows stop there and are filled with it.
        prefill: "exact" (the recurrence), "parallel" (J hard Jacobi passes, the cache filled from
            the last), "converged" (passes until the latents stop moving; exact if they do not
            within the cap) or "auto" (:func:`ponderlm.model.recurrence.resolve_prefill`).
        on_token: called with (tokens (B,), depths (B,)) as each token is chosen (token schedule).
        schedule: "token" or "slot" (module docstring); "auto" is slot for a router model with
            B > 1 and no on_token. Round methods (loop, PonderLM-1) decode by token.
    """
    check_sampling(temperature, top_k, top_p)  # here, before the prefill: not at the first sampled token
    opt = _resolve(model, input_ids, max_new_tokens, attention_mask, tau, seed, prefill, schedule,
                   on_token is not None, jacobi_iters)  # fmt: skip
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None

    def pick(logits: Tensor) -> Tensor:
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)

    capacity = (input_ids.shape[1] + max_new_tokens) * model.cfg.slots_per_token
    if opt.schedule == "slot" and opt.prefill == "exact":  # the slot schedule walks the prompt itself
        return _SlotDecoder(model, input_ids, opt, max_new_tokens, pick, eos_token_id, capacity).run(None)
    out, cache = recurrence.prefill(model, input_ids, tau=opt.tau, attention_mask=opt.mask, how=opt.prefill,
                                    jacobi_iters=opt.jacobi_iters, capacity=capacity, with_logits=False)  # fmt: skip
    if opt.schedule == "slot":
        dec = _SlotDecoder(model, input_ids, opt, max_new_tokens, pick, eos_token_id, capacity, cache)
        return dec.run((out.hidden[:, -1], out.depth.long()))
    return _decode_by_token(model, input_ids, out, cache, opt, max_new_tokens, pick, eos_token_id, on_token)


def _decode_by_token(
    model: PonderLM,
    input_ids: Tensor,
    prompt: PonderOutput,
    cache,
    opt: _Options,
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    eos_token_id: int | None,
    on_token: Callable[[Tensor, Tensor], None] | None,
) -> GenerateOutput:
    """The token schedule: every row advances one token per step through :func:`recurrence.extend`."""
    B = input_ids.shape[0]
    h_last, prompt_depth = prompt.hidden[:, -1], prompt.depth.long()
    depth_last = prompt_depth[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, depths = [], []
    for i in range(max_new_tokens):
        nxt = pick(model.lm_head(h_last))  # (B,)
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
        step = recurrence.extend(model, nxt.unsqueeze(1), cache, tau=opt.tau, attention_mask=~finished.unsqueeze(1),
                                 with_logits=False)  # fmt: skip
        h_last, depth_last = step.hidden[:, 0], step.depth[:, 0].long()
    new = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(B, 0)
    dep = torch.stack(depths, 1) if depths else input_ids.new_zeros(B, 0)
    return GenerateOutput(tokens=torch.cat([input_ids, new], dim=1), depth=dep, prompt_depth=prompt_depth,
                          cache_entries=cache.num_entries())  # fmt: skip


class _SlotDecoder:
    """The slot schedule: each call of :func:`recurrence.advance_slots` advances every running row
    by one slot of its own.

    A row walks through its prompt's real tokens (teacher-forced, unless a parallel prefill
    already holds them in the cache: then it starts from the last prompt hidden state), then
    through the tokens it samples. The slots themselves - inputs, positions, key biases, cache
    entries, routing - are the recurrence (:class:`ponderlm.model.recurrence.SlotState`); this class
    only keeps the books: ``col`` (prompt column of the token each row ponders; >= T once
    generating), the emitted tokens and depths, and which rows still run.
    """

    def __init__(
        self,
        model: PonderLM,
        input_ids: Tensor,
        opt: _Options,
        max_new_tokens: int,
        pick: Callable[[Tensor], Tensor],
        eos_token_id: int | None,
        capacity: int,
        cache=None,
    ) -> None:
        B, T = input_ids.shape
        dev = input_ids.device
        self.model, self.ids, self.opt, self.N, self.pick, self.eos = (
            model,
            input_ids,
            opt,
            max_new_tokens,
            pick,
            eos_token_id,
        )
        self.cache = cache if cache is not None else model.new_cache(B, capacity=capacity)
        self.real = opt.mask if opt.mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        fill = eos_token_id if eos_token_id is not None else 0
        self.tokens = torch.full((B, max_new_tokens), fill, dtype=input_ids.dtype, device=dev)  # filler after EOS
        self.depths = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        self.n_gen = torch.zeros(B, dtype=torch.long, device=dev)  # tokens emitted per row
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)  # emitted EOS
        self.st = recurrence.new_slot_state(model, B, dev, model.embed_tokens.weight.dtype)

    def emit(self, idx: Tensor, h_hat: Tensor, d: Tensor) -> Tensor:
        """Rows idx finished pondering the token that produces output n_gen: sample it. -> (n,)."""
        j = self.n_gen[idx]
        nxt = self.pick(self.model.lm_head(h_hat))
        self.tokens[idx, j] = nxt
        self.depths[idx, j] = d
        if self.eos is not None:
            self.finished[idx] |= nxt == self.eos
        self.n_gen[idx] += 1
        return nxt

    def run(self, prefilled: tuple[Tensor, Tensor] | None) -> GenerateOutput:
        B, T = self.ids.shape
        rows = torch.arange(B, device=self.ids.device)
        if prefilled is not None:  # the cache holds the prompt; its last hidden state gives token 0
            h_last, self.prompt_depth = prefilled
            self.col = torch.full((B,), T, dtype=torch.long, device=self.ids.device)
            nxt = self.emit(rows, h_last, self.prompt_depth[:, -1]) if self.N > 0 else self.ids[:, -1]
            self.st.start(rows, self.model.embed(nxt), self.real.sum(-1).long())
            running = ~self.finished & (self.n_gen < self.N)
        else:
            self.prompt_depth = torch.zeros(B, T, dtype=torch.long, device=self.ids.device)
            self.col = (~self.real).sum(-1).long()  # first real column (left padding)
            self.st.start(rows, self.model.embed(self.ids[rows, self.col]), torch.zeros_like(self.col))
            running = torch.ones(B, dtype=torch.bool, device=self.ids.device)
        while bool(running.any()):
            done = recurrence.advance_slots(self.model, self.st, running, self.cache, self.opt.tau)
            if bool(done.any()):
                self.next_tokens(done.nonzero().squeeze(1))
            running = running & ~self.finished & ~((self.col >= T) & (self.n_gen >= self.N))
        width = int(self.n_gen.max()) if self.N > 0 else 0
        return GenerateOutput(tokens=torch.cat([self.ids, self.tokens[:, :width]], dim=1),
                              depth=self.depths[:, :width], prompt_depth=self.prompt_depth,
                              cache_entries=self.cache.num_entries())  # fmt: skip

    def next_tokens(self, idx: Tensor) -> None:
        """Rows idx completed a token: record its depth, then start their next token - the next
        prompt token (teacher-forced) or a sampled one."""
        T = self.ids.shape[1]
        h_hat = recurrence.mix_slots(self.model, self.st, idx)  # (n, D)
        d, c = self.st.depth[idx], self.col[idx]
        in_prompt = c < T
        self.prompt_depth[idx[in_prompt], c[in_prompt]] = d[in_prompt]
        c = c + 1
        self.col[idx] = c
        new = self.ids[idx, c.clamp(max=T - 1)]  # teacher-forced: the next prompt token
        sample = (c >= T) & (self.n_gen[idx] < self.N)  # pondered the last prompt token or a generated one
        if bool(sample.any()):
            new[sample] = self.emit(idx[sample], h_hat[sample], d[sample])
        self.st.start(idx, self.model.embed(new), self.st.pos[idx] + 1)
