"""The exact recurrence: what a PonderLM computes at inference, slot by slot with a KV cache.

This module holds the sequential computation that ``forward(mode="exact")``, both schedules of
``ponderlm.model.generate``, the serving scheduler and the transformers adapter run; the model
(``ponderlm.model.model``) holds the parameters, the primitives the recurrence is built from
(``embed``, ``stack``, ``route``, ``mix``, ``new_cache``) and the parallel soft/hard passes.

The recurrence is written once, :func:`advance_slots` (one slot per running row, state in a
:class:`SlotState`); the rest builds on it:

    advance_slots   one slot per running row                        (the recurrence)
    ponder_tokens   one token per row: advance until every row's token is done
                    (round methods: one slot per round, each round in its own cache)
    extend          L tokens per row appended to a cache (positions from cache.next_pos)
    prefill         a prompt into a new cache: exact, or parallel passes (``resolve_prefill``)
    exact           forward's exact mode: the exact prefill, its cache on the output

Every function takes the model as its first argument. This module imports the model only for
type checking, so ``ponderlm.model.model`` can call into it (forward's exact mode) without an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ponderlm.model import slots
from ponderlm.model.cache import KVCache, RoundCaches
from ponderlm.model.config import check_tau

if TYPE_CHECKING:
    from ponderlm.model.model import PonderLM, PonderOutput

# converged prefill: refine until no latent moves by more than this, at most this many refinements
PREFILL_TOL = 1e-4
PREFILL_MAX_ITERS = 30


@dataclass
class TokenStep:
    """What the exact recurrence yields for one token per row."""

    hidden: Tensor  # (B, D) mixed final hidden state: the head's input
    depth: Tensor  # (B,) long: realised ponder steps (0 for inactive rows)
    router_probs: Tensor | None = None  # (B, K+1) PonderLM-3
    log_reach: Tensor | None = None  # (B, K+1) PonderLM-3


@dataclass
class SlotState:
    """Per-row state of the slot-level recurrence (:func:`advance_slots`): one token in flight per
    row. Rows may be at different slots of different tokens (the slot schedule of decoding); the
    token-level recurrence keeps them in step."""

    x: Tensor  # (B, D) input of each row's next slot
    pos: Tensor  # (B,) long: position of each row's token
    stage: Tensor  # (B,) long: the slot each row computes next (0 = token slot, k = latent slot k)
    depth: Tensor  # (B,) long: its token's depth, fixed once its token slot has run
    hs: Tensor  # (B, K+1, D) slot hidden states of its token so far
    probs: Tensor  # (B, K+1) router distribution of its token (zeros without a router)
    log_reach: Tensor  # (B, K+1) log w of its token (zeros: the token slot's key bias)

    def start(self, rows: Tensor, x: Tensor, pos: Tensor) -> None:
        """Rows ``rows`` (indices) begin a new token: slot input ``x`` (n, D) at ``pos`` (n,)."""
        self.x[rows] = x
        self.pos[rows] = pos
        self.stage[rows] = 0

    def select(self, rows: Tensor) -> SlotState:
        """The state of rows ``rows`` (n,) only, in that order (rows leaving a running batch)."""
        return SlotState(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def append(self, other: SlotState) -> SlotState:
        """This state's rows followed by ``other``'s (rows joining a running batch)."""
        return SlotState(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)})


def new_slot_state(model: PonderLM, batch: int, device: torch.device, dtype: torch.dtype) -> SlotState:
    """An empty :class:`SlotState` for ``batch`` rows (every row's token at depth K until a
    router decides otherwise)."""
    K, D = model.cfg.n_latent, model.cfg.d_model
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    return SlotState(
        x=torch.zeros(batch, D, dtype=dtype, device=device), pos=zeros, stage=zeros.clone(),
        depth=torch.full((batch,), K, dtype=torch.long, device=device),
        hs=torch.zeros(batch, K + 1, D, dtype=dtype, device=device),
        probs=torch.zeros(batch, K + 1, dtype=dtype, device=device),
        log_reach=torch.zeros(batch, K + 1, dtype=dtype, device=device),
    )  # fmt: skip


def advance_slots(model: PonderLM, st: SlotState, running: Tensor, cache: KVCache, tau: float) -> Tensor:
    """The exact recurrence, one slot per running row: the one place where a slot is computed
    at inference, routed and fed forward. Every decoding path runs it.

    Each running row computes the slot its state points at - its token slot (stage 0), after
    which the router (PonderLM-3) fixes the token's depth from the slot's hidden state, or its
    latent slot k with key bias log w_k - and appends it to the cache. Rows whose token's last
    slot this was are returned as done (their slot hiddens are complete in ``st.hs``); the
    others move on to their next slot, whose input is this slot's hidden state (latent
    thoughts) or the next learned embedding (pause).

    Args: running (B,) bool, rows that compute a slot (the others add nothing to the cache).
    Returns done (B,) bool.
    """
    B = running.shape[0]
    rows = torch.arange(B, device=running.device)
    bias = None  # the token slot's key bias is 0: None keeps plain causal attention when no row needs one
    if model.router is not None and bool((running & (st.stage > 0)).any()):
        bias = st.log_reach.gather(1, st.stage.unsqueeze(1))  # (B, 1)
    h = model.stack(st.x.unsqueeze(1), st.pos.unsqueeze(1), bias, cache, running.long())[:, 0]  # (B, D)
    first = running & (st.stage == 0)
    if model.router is not None and bool(first.any()):
        probs, log_reach = model.route(h)  # (B, K+1) each
        st.probs = torch.where(first.unsqueeze(1), probs, st.probs)
        st.log_reach = torch.where(first.unsqueeze(1), log_reach, st.log_reach)
        st.depth = torch.where(first, slots.prune_depth(log_reach.unsqueeze(1), tau)[:, 0], st.depth)
    st.hs[rows, st.stage] = torch.where(running.unsqueeze(1), h, st.hs[rows, st.stage])
    done = running & (st.stage == st.depth)
    more = running & ~done
    st.stage = torch.where(more, st.stage + 1, st.stage)
    nxt = h  # a latent thought takes the slot's hidden state; a pause slot its learned embedding
    if model.pause_embed is not None:
        nxt = model.pause_inputs().to(h.dtype)[(st.stage - 1).clamp_min(0)]  # (B, D)
    st.x = torch.where(more.unsqueeze(1), nxt, st.x)
    return done


def mix_slots(model: PonderLM, st: SlotState, rows: Tensor | slice, width: int | None = None) -> Tensor:
    """Output hidden state of the tokens of ``rows`` from their first ``width`` slot hiddens
    (default all K+1; slots beyond a token's depth carry no weight). Returns (n, D)."""
    width = model.cfg.slots_per_token if width is None else width
    depth = st.depth[rows]
    keep = slots.depth_keep(depth.unsqueeze(1), width)  # (n, 1, width)
    probs = st.probs[rows].unsqueeze(1) if model.router is not None else None
    return model.mix(st.hs[rows, :width].unsqueeze(1), probs, keep)[:, 0]


def mix_slots_by_depth(model: PonderLM, st: SlotState, rows: list[int], depths: list[int]) -> Tensor:
    """:func:`mix_slots` of each row over its own ``depth + 1`` slots, the rows of one depth mixed
    together (``mix_slots(model, st, those rows, d + 1)``, the same ``model.mix`` call on the same
    slots), their slots gathered once. ``rows`` (batch indices) are sorted by their ``depths`` (the
    depth of each row's completed token). Returns (n, D), in the order of ``rows``."""
    idx = torch.tensor(rows, dtype=torch.long, device=st.hs.device)  # (n,)
    hs = st.hs[idx]  # (n, K+1, D)
    probs = st.probs[idx].unsqueeze(1) if model.router is not None else None  # (n, 1, K+1)
    parts, a = [], 0
    while a < len(depths):  # one run of rows per depth
        d, b = depths[a], a + 1
        while b < len(depths) and depths[b] == d:
            b += 1
        keep = torch.ones(b - a, 1, d + 1, dtype=torch.bool, device=hs.device)  # each row's every slot up to d
        p = probs[a:b] if probs is not None else None
        parts.append(model.mix(hs[a:b, : d + 1].unsqueeze(1), p, keep)[:, 0])  # (b - a, D)
        a = b
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def ponder_tokens(
    model: PonderLM, x: Tensor, pos: Tensor, active: Tensor, cache: KVCache | RoundCaches, tau: float
) -> TokenStep:
    """The exact recurrence for one token per row, appending its computed slots to the cache.

    Slot methods run :func:`advance_slots` until every active row's token is complete (a call
    per slot of the deepest row); round methods run their K+1 rounds, one slot per round, each
    in its own cache. Rows with ``active`` False (padding, finished sequences) add nothing.

    Args: x (B, D) token slot inputs; pos (B,) positions; active (B,) bool; tau threshold.
    """
    if model.cfg.n_rounds > 1:
        return _round_tokens(model, x, pos, active, cache)
    st = new_slot_state(model, x.shape[0], x.device, x.dtype)
    st.x, st.pos = x, pos
    st.depth = st.depth * active
    running = active.clone()
    while True:
        running = running & ~advance_slots(model, st, running, cache, tau)
        if not bool(running.any()):
            break
    width = int(st.depth.max()) + 1  # the slots any row computed
    h_hat = mix_slots(model, st, slice(None), width)
    if model.router is None:
        return TokenStep(h_hat, st.depth)
    return TokenStep(h_hat, st.depth, st.probs, st.log_reach)


def _round_tokens(model: PonderLM, x: Tensor, pos: Tensor, active: Tensor, cache: RoundCaches) -> TokenStep:
    """Round methods: K+1 slots per token, one per round, each appended to its round's cache."""
    cfg, e = model.cfg, x
    pos = pos.view(-1, 1)
    for r in range(cfg.n_rounds):
        last = r == cfg.n_rounds - 1
        h = model.stack(x.unsqueeze(1), pos, None, cache[r], active.long(), cfg.round_ends_in_norm(last))[:, 0]
        x = model.next_round_input(e, h, last)
    return TokenStep(x, cfg.max_depth * active.long())


def extend(
    model: PonderLM,
    input_ids: Tensor,
    cache: KVCache | RoundCaches,
    *,
    tau: float | None = None,
    attention_mask: Tensor | None = None,
    with_logits: bool = True,
) -> PonderOutput:
    """Run L more tokens per row through the exact recurrence, appending to ``cache``.

    Positions continue from ``cache.next_pos`` (0 for a new cache) and count only real tokens
    (``attention_mask`` 1), which is also what the cache holds. Returns the hidden state,
    realised depth (and router outputs) of every new token, and its logits (zeros at padding)
    unless ``with_logits`` is False; ``cache.next_pos`` moves past the real tokens.

    Args: input_ids (B, L); attention_mask (B, L) or None (all real).
    """
    model.check_input_ids(input_ids)
    tau = check_tau(model.cfg.tau if tau is None else tau)
    B, L = input_ids.shape
    dev = input_ids.device
    active = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
    start = cache.next_pos if cache.next_pos is not None else torch.zeros(B, dtype=torch.long, device=dev)
    pos = start.view(B, 1) + (active.long().cumsum(-1) - active.long())  # (B, L) real tokens count on
    if int(pos.max()) >= model.cfg.max_seq_len:
        raise ValueError(f"sequence exceeds max_seq_len {model.cfg.max_seq_len}")
    e = model.embed(input_ids)  # (B, L, D)
    steps = [ponder_tokens(model, e[:, i], pos[:, i], active[:, i], cache, tau) for i in range(L)]
    cache.next_pos = start + active.long().sum(-1)
    hidden = torch.stack([s.hidden for s in steps], dim=1)  # (B, L, D)
    out = model.output(hidden, torch.stack([s.depth for s in steps], dim=1).float(), with_logits=with_logits)
    if out.logits is not None:
        out.logits = out.logits.masked_fill(~active.unsqueeze(-1), 0.0)  # zeros at padding
    if model.router is not None:
        out.router_probs = torch.stack([s.router_probs for s in steps], dim=1)
        out.log_reach = torch.stack([s.log_reach for s in steps], dim=1)
    return out


def resolve_prefill(model: PonderLM, how: str) -> str:
    """The prompt computation for decoding: "exact" (the recurrence), "parallel" (J hard-pruned
    Jacobi passes, the cache filled from the final pass) or "converged" (parallel passes until
    the latents stop changing - :data:`PREFILL_TOL` - with a cap and a fallback to exact);
    "auto" is converged when the parallel computation only approximates the recurrence (latent
    feedback: the recurrence to that tolerance, several times faster than exact), parallel
    otherwise (where the two coincide)."""
    if how == "auto":
        return "converged" if model.cfg.uses_jacobi else "parallel"
    if how not in ("exact", "parallel", "converged"):
        raise ValueError(f"prefill must be 'auto', 'exact', 'parallel' or 'converged', got {how!r}")
    return how


def prefill(
    model: PonderLM,
    input_ids: Tensor,
    *,
    tau: float | None = None,
    attention_mask: Tensor | None = None,
    how: str = "auto",
    jacobi_iters: int | None = None,
    capacity: int | None = None,
    with_logits: bool = True,
) -> tuple[PonderOutput, KVCache | RoundCaches]:
    """Run a (left-padded) prompt and return its output and a filled cache ready for
    :func:`extend` / :func:`advance_slots`. ``how``: see :func:`resolve_prefill`;
    ``capacity``: cache slots to reserve (it grows as needed)."""
    model.check_input_ids(input_ids)
    how = resolve_prefill(model, how)
    tau = check_tau(model.cfg.tau if tau is None else tau)
    B, T = input_ids.shape
    mask = attention_mask.bool() if attention_mask is not None else None
    cache = model.new_cache(B, capacity=capacity or T * model.cfg.slots_per_token)
    if how == "exact":
        return extend(model, input_ids, cache, tau=tau, attention_mask=mask, with_logits=with_logits), cache
    tol = PREFILL_TOL if how == "converged" and model.cfg.uses_jacobi else None
    J = jacobi_iters or (PREFILL_MAX_ITERS if tol is not None else model.cfg.jacobi_iters)
    out = model.parallel(input_ids, "hard", tau, J, mask, cache, tol=tol, with_logits=with_logits)
    if tol is not None and not out.converged:  # not within the cap: the sequential recurrence instead
        return prefill(model, input_ids, tau=tau, attention_mask=mask, how="exact", capacity=capacity,
                       with_logits=with_logits)  # fmt: skip
    cache.next_pos = mask.long().sum(-1) if mask is not None else torch.full_like(input_ids[:, 0], T)
    return out, cache


def exact(
    model: PonderLM, input_ids: Tensor, tau: float, token_mask: Tensor | None, with_logits: bool = True
) -> PonderOutput:
    """``forward(mode="exact")`` (arguments already checked): the exact prefill of the whole
    sequence, with the filled cache on ``out.cache``."""
    out, cache = prefill(model, input_ids, tau=tau, attention_mask=token_mask, how="exact", with_logits=with_logits)
    out.cache = cache
    return out
