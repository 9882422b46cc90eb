"""PonderLM: one forward for every method (vanilla, pause, loop, PonderLM-1, -2, -3).

Two layouts share the code. *Slot* methods (pause, ponderlm2, ponderlm3) give each token K extra
slots interleaved in one sequence at the token's position: pause slots take learned embeddings,
latent thoughts take the previous slot's final hidden state. *Round* methods (loop, ponderlm1)
run K+1 full passes over the length-T sequence, each with its own attention context: loop feeds
the residual stream back through the shared stack, PonderLM-1 feeds ``e_t + softmax(head(h)) @ E``.
Only latent thoughts need Jacobi iterations; every other method is exact in one parallel forward.

Three explicit modes, never inferred from ``self.training``:

* ``soft``  the training computation. Interleaved slots with shared positions, staged warm-up,
  J Jacobi refinement passes and a final pass; the router's ``log w`` rides as a per-key bias
  inside fused attention; the output mixes the slots by the router distribution.
* ``hard``  the same parallel (Jacobi) computation with hard pruning at ``tau``: pruned slots are
  removed from the sequence, so they cost nothing. This is the scoring path.
* ``exact`` the sequential recurrence, slot by slot with a KV cache, pruning at ``tau``. This is
  what the model *is* at inference; ``soft``/``hard`` converge to it as J grows.

The exact recurrence is written once, :meth:`PonderLM.advance_slots` (one slot per running row);
:meth:`ponder_tokens`, :meth:`extend` and :meth:`prefill` build on it, and every decoding path
(``exact`` mode, both schedules of ``ponderlm.generate``, the transformers adapter) uses them.
What a method is comes from its capabilities (``ModelConfig.spec``), never from its name. The
loss lives in ``ponderlm.losses``; decoding in ``ponderlm.generate``; docs/DESIGN.md has the map.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import slots
from .cache import KVCache, RoundCaches
from .config import ModelConfig, check_tau
from .layers import Block, RMSNorm, RotaryEmbedding

Mode = Literal["soft", "hard", "exact"]
MODES = ("soft", "hard", "exact")
# converged prefill: refine until no latent moves by more than this, at most this many refinements
PREFILL_TOL = 1e-4
PREFILL_MAX_ITERS = 30
# hard-mode arguments of that rule: the default scoring of evaluation and experiments, so every
# default number is the recurrence generate runs, to PREFILL_TOL (methods without latent feedback
# are exact in one pass and ignore both)
CONVERGED = {"jacobi_iters": PREFILL_MAX_ITERS, "jacobi_tol": PREFILL_TOL}


@dataclass
class PonderOutput:
    logits: Tensor | None  # (B, T, V); None when asked for with_logits=False (``hidden`` is what the head maps)
    depth: Tensor  # (B, T) float: expected steps (soft) or realised steps (hard/exact)
    router_probs: Tensor | None = None  # (B, T, K+1) s_t over depths 0..K (PonderLM-3)
    log_reach: Tensor | None = None  # (B, T, K+1) log w_{t,k}, clamped at log_floor
    hidden: Tensor | None = None  # (B, T, D) mixed final hidden state fed to the head
    token_hidden: Tensor | None = None  # (B, T, D) final hidden state of the token slot, h^(0)
    jacobi_residual: Tensor | None = None  # max |change| of the latents in the last refinement
    jacobi_passes: int | None = None  # parallel passes run (soft/hard)
    converged: bool | None = None  # soft/hard with jacobi_tol: whether the latents reached the tolerance
    cache: KVCache | None = None  # exact mode: the filled cache


@dataclass
class TokenStep:
    """What the exact recurrence yields for one token per row."""

    hidden: Tensor  # (B, D) mixed final hidden state: the head's input
    depth: Tensor  # (B,) long: realised ponder steps (0 for inactive rows)
    router_probs: Tensor | None = None  # (B, K+1) PonderLM-3
    log_reach: Tensor | None = None  # (B, K+1) PonderLM-3


@dataclass
class SlotState:
    """Per-row state of the slot-level recurrence (:meth:`PonderLM.advance_slots`): one token in
    flight per row. Rows may be at different slots of different tokens (the slot schedule of
    decoding); the token-level recurrence keeps them in step."""

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


@dataclass
class _Passes:
    """The state of the parallel computation after its latest pass."""

    h: Tensor | None = None  # (B, T, c, D) slot hidden states
    probs: Tensor | None = None  # (B, T, K+1) router distribution (PonderLM-3)
    log_reach: Tensor | None = None  # (B, T, K+1) key bias of the next pass
    keep: Tensor | None = None  # (B, T, c) slots computed (hard mode)
    residual: Tensor | None = None  # max |change| of the latents in the last refinement
    passes: int = 0  # passes run
    converged: bool = False  # stopped because the latents (and the kept slots) stopped changing


class Router(nn.Module):
    """Predicts a distribution over ponder depths 0..K from the token slot's hidden state."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        S = cfg.max_ponder_steps + 1
        if cfg.router == "mlp":
            self.fc = nn.Linear(cfg.d_model, cfg.router_width)
            self.proj = nn.Linear(cfg.router_width, S)
        else:
            self.fc = None
            self.proj = nn.Linear(cfg.d_model, S)

    def forward(self, h: Tensor) -> Tensor:
        """h (..., D) -> router logits (..., K+1), in at least float32."""
        if self.fc is not None:
            h = F.silu(self.fc(h))
        logits = self.proj(h)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def reach_log_probs(router_logits: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Router logits -> (s, log w): s = softmax, w_k = sum_{j>=k} s_j (tail CDF).

    Computed in log space (reverse logcumsumexp) so tiny reach probabilities stay accurate;
    log w is clamped at ``floor`` and log w_0 is exactly 0. Shapes (..., K+1).
    """
    lse = torch.logsumexp(router_logits, dim=-1, keepdim=True)
    tail = torch.logcumsumexp(router_logits.flip(-1), dim=-1).flip(-1)
    log_reach = (tail - lse).clamp(min=floor)
    log_reach = torch.cat([torch.zeros_like(log_reach[..., :1]), log_reach[..., 1:].clamp(max=0.0)], dim=-1)
    return torch.softmax(router_logits, dim=-1), log_reach


class PonderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.router = Router(cfg) if cfg.has_router else None
        # pause: K learned embeddings, one per pause slot, shared by all tokens
        self.pause_embed = nn.Embedding(cfg.max_ponder_steps, cfg.d_model) if cfg.learned_slots else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        if cfg.init == "reference":
            std = math.sqrt(2.0 / (5.0 * cfg.d_model))

            def init(w: Tensor, s: float) -> None:
                nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)
        else:
            std = cfg.init_std or 0.02

            def init(w: Tensor, s: float) -> None:
                nn.init.normal_(w, std=s)

        out_std = std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                init(p, out_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                init(p, std)
        if self.router is not None:
            d = cfg.max_ponder_steps if cfg.router_init_depth is None else cfg.router_init_depth
            self.router.proj.bias[d] = cfg.router_init_bias

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    # ------------------------------------------------------------ primitives
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, D) token slot inputs, scaled to unit RMS when scale_embeds."""
        e = self.embed_tokens(input_ids)
        return e * self.cfg.embed_scale if self.cfg.scale_embeds else e

    def pause_inputs(self) -> Tensor:
        """(K, D) inputs of the pause slots, scaled like token embeddings."""
        assert self.pause_embed is not None
        w = self.pause_embed.weight
        return w * self.cfg.embed_scale if self.cfg.scale_embeds else w

    def soft_token_feedback(self, e: Tensor, h: Tensor) -> Tensor:
        """PonderLM-1's next-pass input: e + softmax(lm_head(h)) @ E (scaled like e). (..., D)."""
        logits = self.lm_head(h)
        p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(e.dtype)  # (.., V)
        soft = p @ self.embed_tokens.weight.to(e.dtype)  # expected embedding (..., D)
        return e + (soft * self.cfg.embed_scale if self.cfg.scale_embeds else soft)

    def stack(
        self,
        x: Tensor,
        positions: Tensor,
        key_bias: Tensor | None,
        cache: KVCache | None = None,
        n_new: Tensor | None = None,
        final_norm: bool = True,
    ) -> Tensor:
        """Run all blocks and the final norm over a slot sequence.

        Args: x (B, L, D); positions (B, L); key_bias (B, L) or None; cache and n_new (B,)
        (real slots per row, the rest is tail padding) when slots should enter a KV cache;
        final_norm False returns the raw residual stream (loop's inner rounds).
        Returns the final hidden states (B, L, D) -- also the latent-thought inputs.
        """
        rope = self.rope(positions, x.dtype)
        if cache is not None:
            cache.begin(n_new, x.shape[1], key_bias)
        for layer in self.layers:
            x = layer(x, rope, key_bias, cache)
        if cache is not None:
            cache.end()
        return self.norm(x) if final_norm else x

    def route(self, h0: Tensor) -> tuple[Tensor, Tensor]:
        """h0 (..., D) token-slot hidden -> (s, log w), each (..., K+1)."""
        assert self.router is not None
        return reach_log_probs(self.router(h0), self.cfg.log_floor)

    def mix(self, h: Tensor, probs: Tensor | None, keep: Tensor | None) -> Tensor:
        """Output hidden state from the slots of each token.

        Args: h (B, T, c, D) slot hiddens; probs (B, T, K+1) router distribution (PonderLM-3);
        keep (B, T, c) which slots were computed (hard/exact), or None (soft: all).
        Returns (B, T, D).
        """
        cfg = self.cfg
        if self.router is None:  # vanilla: the token slot; pause/ponderlm2: the last slot
            return h[:, :, -1]
        c = h.shape[2]
        wts = probs[..., :c]
        if keep is not None:
            wts = wts * keep.to(wts.dtype)
            if cfg.renormalize_pruned:
                wts = wts / wts.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.einsum("btk,btkd->btd", wts.to(h.dtype), h)

    def _pass(
        self,
        x: Tensor,
        tok_pos: Tensor,
        log_reach: Tensor | None,
        keep: Tensor | None,
        cache: KVCache | None = None,
        final_norm: bool = True,
    ) -> Tensor:
        """One pass over the first c stages of every token.

        Args: x (B, T, c, D) slot inputs; tok_pos (B, T); log_reach (B, T, >=c) or None;
        keep (B, T, c) bool or None (all kept). Pruned slots are removed, not masked.
        Returns (B, T, c, D) hidden states, zero at pruned slots.
        """
        B, T, c, _ = x.shape
        pos = slots.slot_positions(tok_pos, c)  # (B, T, c)
        bias = None
        if log_reach is not None and c > 1:
            bias = F.pad(log_reach[..., 1:c], (1, 0))  # (B, T, c): token slot bias 0
        if keep is None or bool(keep.all()):
            n = torch.full((B,), T * c, device=x.device, dtype=torch.long)
            flat_bias = slots.interleave(bias) if bias is not None else None
            out = self.stack(slots.interleave(x), slots.interleave(pos), flat_bias, cache, n, final_norm)
            return slots.deinterleave(out, c)
        flat_keep = slots.interleave(keep)  # (B, T*c)
        if not bool(flat_keep.any()):  # nothing to compute (an all-padding batch)
            return x.new_zeros(x.shape)
        idx, n = slots.pack_slots(flat_keep)  # (B, L), (B,)
        xs = slots.gather_slots(slots.interleave(x), idx)  # (B, L, D)
        ps = slots.gather_slots(slots.interleave(pos), idx)
        bs = slots.gather_slots(slots.interleave(bias), idx) if bias is not None else None
        out = self.stack(xs, ps, bs, cache, n, final_norm)
        return slots.deinterleave(slots.scatter_slots(out, idx, flat_keep), c)

    # --------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        *,
        mode: Mode,
        tau: float | None = None,
        jacobi_iters: int | None = None,
        attention_mask: Tensor | None = None,
        depth_override: Tensor | None = None,
        jacobi_tol: float | None = None,
        with_logits: bool = True,
    ) -> PonderOutput:
        """Next-token logits for every position.

        Args:
            input_ids: (B, T) token ids.
            mode: "soft" (training), "hard" (parallel, pruned) or "exact" (sequential, cached).
            tau: pruning threshold for hard/exact (default cfg.tau); not used by soft.
            jacobi_iters: refinement passes J for soft/hard (default cfg.jacobi_iters).
            attention_mask: (B, T) 1 for real tokens, 0 for padding (hard/exact only).
                Padding may sit anywhere (left padding for generation); padded tokens get no
                slots at all and their logits are zeros.
            depth_override: (B, T) integer depths in [0, K] that replace the router's pruning
                (hard mode, slot methods): the ablations (fixed depth, random or
                entropy-ranked allocation) compute exactly these slots and no others.
            jacobi_tol: soft/hard: refine until no latent changes by more than this (then
                ``jacobi_iters`` is a cap), report ``out.converged`` and ``out.jacobi_passes``.
            with_logits: False skips the head: ``out.logits`` is None and ``out.hidden`` (B, T, D)
                is what ``lm_head`` maps to them, for scorers that need a few positions' logits
                rather than (B, T, vocab) of them.
        """
        tau, attention_mask, depth_override = self._check_forward(input_ids, mode, tau, attention_mask,
                                                                  depth_override)  # fmt: skip
        if mode == "exact":
            return self._exact(input_ids, tau, attention_mask, with_logits)
        J = self.cfg.jacobi_iters if jacobi_iters is None else int(jacobi_iters)
        if J < 1:
            raise ValueError(f"jacobi_iters must be >= 1, got {J}")
        if jacobi_tol is not None and not jacobi_tol > 0:
            raise ValueError(f"jacobi_tol must be > 0, got {jacobi_tol}")
        return self._parallel(input_ids, mode, tau, J, attention_mask, depth_override=depth_override, tol=jacobi_tol,
                              with_logits=with_logits)  # fmt: skip

    def _check_forward(
        self, input_ids: Tensor, mode: str, tau: float | None, mask: Tensor | None, depth_override: Tensor | None
    ) -> tuple[float, Tensor | None, Tensor | None]:
        """Validate forward's arguments; returns (tau, mask as bool, depth_override as long)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.check_input_ids(input_ids)
        if mode == "soft" and tau is not None:
            raise ValueError("tau is a hard/exact-mode knob; soft mode never prunes")
        if mode == "soft" and mask is not None:
            raise ValueError("soft mode takes packed sequences without padding")
        tau = check_tau(self.cfg.tau if tau is None else tau)
        if depth_override is not None:
            K = self.cfg.n_latent
            if mode != "hard" or not self.cfg.has_router:
                # pause/ponderlm2 read the last slot, which a shallower depth would leave uncomputed
                raise ValueError("depth_override needs mode='hard' and a PonderLM-3 model")
            if depth_override.shape != input_ids.shape:
                raise ValueError(f"depth_override shape {tuple(depth_override.shape)} != {tuple(input_ids.shape)}")
            if int(depth_override.min()) < 0 or int(depth_override.max()) > K:
                raise ValueError(f"depth_override values must lie in [0, {K}]")
            depth_override = depth_override.long()
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return tau, mask.bool() if mask is not None else None, depth_override

    def check_input_ids(self, ids: Tensor) -> None:
        """(B, T) integer ids, non-empty, within the context and the vocabulary; ValueError otherwise."""
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a (B, T) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() == 0:  # caught here: deeper down an empty batch fails in a reshape or a stack
            raise ValueError(f"input_ids is empty, shape {tuple(ids.shape)}: need at least one row of one token")
        if ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]"
            )

    def _parallel(
        self,
        input_ids: Tensor,
        mode: Mode,
        tau: float,
        J: int,
        token_mask: Tensor | None,
        cache: KVCache | None = None,
        depth_override: Tensor | None = None,
        tol: float | None = None,
        with_logits: bool = True,
    ) -> PonderOutput:
        cfg = self.cfg
        B, T = input_ids.shape
        e = self.embed(input_ids)  # (B, T, D)
        tok_pos = slots.token_positions(B, T, token_mask, e.device)  # (B, T)
        tok_keep = token_mask.unsqueeze(-1) if (mode == "hard" and token_mask is not None) else None
        if cfg.n_rounds > 1:
            return self._rounds(e, tok_pos, tok_keep, token_mask, cache, with_logits)
        if cfg.n_latent == 0:  # vanilla: one pass over the tokens
            h = self._pass(e.unsqueeze(2), tok_pos, None, tok_keep, cache)  # (B, T, 1, D)
            return self._output(self.mix(h, None, None), torch.zeros(B, T, device=e.device), with_logits=with_logits)

        passes = self._slot_passes(e, tok_pos, mode == "hard", tau, J, token_mask, cache, depth_override, tol)
        return self._slot_output(passes, mode == "hard", token_mask, with_logits)

    def _slot_passes(
        self,
        e: Tensor,
        tok_pos: Tensor,
        hard: bool,
        tau: float,
        J: int,
        token_mask: Tensor | None,
        cache: KVCache | None,
        depth_override: Tensor | None,
        tol: float | None = None,
    ) -> _Passes:
        """Run the pass schedule over the interleaved slots (slot methods). Each pass computes the
        first c slots of every token (hard mode: only those the previous pass's router keeps);
        the router on its token slots gives the next pass's key bias and, after the last pass,
        the mixture; every latent then takes the hidden state of the slot before it.

        With ``tol``, J is a cap: the refinements stop as soon as no latent changed by more than
        ``tol`` (and, in hard mode, the kept slots stayed the same), then the final pass runs -
        on converged inputs that is the exact recurrence's fixed point, to that tolerance.

        Args: e (B, T, D) token inputs; tok_pos (B, T). Returns the last pass's state.
        """
        cfg = self.cfg
        B, T, D = e.shape
        K = cfg.n_latent
        schedule = cfg.pass_schedule(J)  # slots per token of each pass (the FLOPs counter reads the same)
        if self.pause_embed is not None:  # inputs known up front: one exact pass over all slots
            latents = self.pause_inputs().to(e.dtype).expand(B, T, K, D)
        else:  # (B, T, c-1, D): inputs of slots 1..; the staged warm-up starts with none
            latents = e.new_zeros(B, T, K if cfg.jacobi_warmup == "zeros" else 0, D)
        st = _Passes()
        n = cfg.jacobi_grad_passes if cfg.uses_jacobi else 0
        grad_from = len(schedule) - n if n else 0  # truncated backprop: earlier passes build no graph
        p, last = 0, len(schedule) - 1
        while p <= last:
            with torch.no_grad() if p < grad_from else contextlib.nullcontext():
                latents = self._one_pass(st, e, latents, tok_pos, schedule[p], p == last, hard, tau, token_mask,
                                         cache, depth_override)  # fmt: skip
            st.passes += 1
            if tol is not None and p < last and self._settled(st, tol, hard, tau, token_mask, depth_override):
                st.converged, p = True, last  # the final pass runs on converged inputs
            else:
                p += 1
        return st

    def _settled(self, st: _Passes, tol: float, hard: bool, tau: float, token_mask: Tensor | None,
                 depth_override: Tensor | None) -> bool:  # fmt: skip
        """The convergence rule: no latent moved by more than ``tol`` in the last full pass and, in
        hard mode, the router now keeps exactly the slots that pass computed."""
        if st.residual is None or float(st.residual) > tol:
            return False
        if not hard or depth_override is not None or st.log_reach is None:
            return True
        keep = slots.depth_keep(slots.prune_depth(st.log_reach, tau), st.keep.shape[-1], token_mask)
        return torch.equal(keep, st.keep)

    def _one_pass(
        self,
        st: _Passes,
        e: Tensor,
        latents: Tensor,
        tok_pos: Tensor,
        c: int,
        last: bool,
        hard: bool,
        tau: float,
        token_mask: Tensor | None,
        cache: KVCache | None,
        depth_override: Tensor | None,
    ) -> Tensor:
        """One pass over the first c slots of every token; updates ``st`` and returns the next
        pass's latent inputs."""
        B, T, _ = e.shape
        K = self.cfg.n_latent
        x = torch.cat([e.unsqueeze(2), latents[:, :, : c - 1]], dim=2)  # (B, T, c, D)
        if hard:
            if depth_override is not None:
                depth = depth_override
            elif st.log_reach is not None:
                depth = slots.prune_depth(st.log_reach, tau)
            else:
                depth = torch.full((B, T), K, device=e.device, dtype=torch.long)
            st.keep = slots.depth_keep(depth, c, token_mask)  # (B, T, c)
        st.h = self._pass(x, tok_pos, st.log_reach, st.keep, cache if last else None)  # (B, T, c, D)
        if self.router is not None:
            st.probs, st.log_reach = self.route(st.h[:, :, 0])  # bias for the next pass, mix for the last
        if not last:
            latents = self._next_latents(st, latents)
        return latents

    def _next_latents(self, st: _Passes, latents: Tensor) -> Tensor:
        """Every latent takes the hidden state of the slot before it; slots a hard pass did not
        compute keep their old input. Records the largest change (the Jacobi residual)."""
        new = st.h[:, :, : self.cfg.n_latent]
        if st.keep is not None:
            old = F.pad(latents, (0, 0, 0, new.shape[2] - latents.shape[2]))
            new = torch.where(st.keep[:, :, : new.shape[2], None], new, old)
        if new.shape[2] == latents.shape[2]:
            with torch.no_grad():
                st.residual = (new - latents).abs().amax()
        return new

    def _slot_output(
        self, st: _Passes, hard: bool, token_mask: Tensor | None, with_logits: bool = True
    ) -> PonderOutput:
        """Logits from the last pass: the mixture (or the last slot), with the realised depth
        (hard), the expected depth under the router (soft) or K."""
        K = self.cfg.n_latent
        B, T = st.h.shape[:2]
        h_hat = self.mix(st.h, st.probs, st.keep)  # (B, T, D)
        if hard:
            depth = (st.keep.sum(-1) - 1).clamp_min(0).float()
        elif st.probs is not None:
            depth = st.probs @ torch.arange(K + 1, device=h_hat.device, dtype=st.probs.dtype)  # E[depth]
        else:
            depth = torch.full((B, T), float(K), device=h_hat.device)
        out = self._output(h_hat, depth, st.probs, st.log_reach, st.residual, with_logits)
        out.token_hidden = st.h[:, :, 0]
        out.jacobi_passes, out.converged = st.passes, st.converged
        if token_mask is not None:
            if out.logits is not None:
                out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            out.depth = out.depth.masked_fill(~token_mask, 0.0)
        return out

    def _rounds(
        self,
        e: Tensor,
        tok_pos: Tensor,
        tok_keep: Tensor | None,
        token_mask: Tensor | None,
        cache: RoundCaches | None = None,
        with_logits: bool = True,
    ) -> PonderOutput:
        """loop / ponderlm1: K+1 full passes over the tokens, each exact and causal on its own.

        Args: e (B, T, D) token inputs; tok_pos (B, T); tok_keep (B, T, 1) real tokens (hard mode
        with padding) or None; cache: one KV cache per round. Depth is K for every real token.
        """
        cfg = self.cfg
        R = cfg.n_rounds
        B, T, _ = e.shape
        x = e
        for r in range(R):
            c = cache[r] if cache is not None else None
            last = r == R - 1
            h = self._pass(x.unsqueeze(2), tok_pos, None, tok_keep, c, cfg.round_ends_in_norm(last))[
                :, :, 0
            ]  # (B, T, D)
            x = self._next_round_input(e, h, last)
        depth = torch.full((B, T), float(cfg.max_depth), device=e.device)
        out = self._output(x, depth, with_logits=with_logits)
        if token_mask is not None:
            if out.logits is not None:
                out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            out.depth = out.depth.masked_fill(~token_mask, 0.0)
        return out

    def _next_round_input(self, e: Tensor, h: Tensor, last: bool) -> Tensor:
        """Round output -> next round's input: the residual stream itself (loop) or the expected
        embedding fed back (PonderLM-1). The last round's output is the model's hidden state."""
        if last or self.cfg.spec.round_input == "residual":
            return h
        return self.soft_token_feedback(e, h)

    def _output(self, h_hat: Tensor, depth: Tensor, probs=None, log_reach=None, residual=None,
                with_logits: bool = True) -> PonderOutput:  # fmt: skip
        return PonderOutput(
            logits=self.lm_head(h_hat) if with_logits else None,
            depth=depth,
            router_probs=probs,
            log_reach=log_reach,
            hidden=h_hat,
            jacobi_residual=residual,
        )

    # ---------------------------------------------------- exact recurrence
    def new_cache(self, batch: int, capacity: int = 64, dtype: torch.dtype | None = None) -> KVCache | RoundCaches:
        """An empty KV cache; round methods get one per round (each round attends only to itself)."""
        p = self.embed_tokens.weight
        cfg = self.cfg
        if dtype is None and torch.is_autocast_enabled(p.device.type):
            dtype = torch.get_autocast_dtype(p.device.type)  # store K/V as the matmuls produce them

        def one() -> KVCache:
            return KVCache(
                cfg.n_layers, batch, cfg.kv_heads, cfg.head_dim,
                device=p.device, dtype=dtype or p.dtype, capacity=capacity,
            )  # fmt: skip

        return RoundCaches([one() for _ in range(cfg.n_rounds)]) if cfg.n_rounds > 1 else one()

    def new_slot_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> SlotState:
        """An empty :class:`SlotState` for ``batch`` rows (every row's token at depth K until a
        router decides otherwise)."""
        K, D = self.cfg.n_latent, self.cfg.d_model
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return SlotState(
            x=torch.zeros(batch, D, dtype=dtype, device=device), pos=zeros, stage=zeros.clone(),
            depth=torch.full((batch,), K, dtype=torch.long, device=device),
            hs=torch.zeros(batch, K + 1, D, dtype=dtype, device=device),
            probs=torch.zeros(batch, K + 1, dtype=dtype, device=device),
            log_reach=torch.zeros(batch, K + 1, dtype=dtype, device=device),
        )  # fmt: skip

    def advance_slots(self, st: SlotState, running: Tensor, cache: KVCache, tau: float) -> Tensor:
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
        if self.router is not None and bool((running & (st.stage > 0)).any()):
            bias = st.log_reach.gather(1, st.stage.unsqueeze(1))  # (B, 1)
        h = self.stack(st.x.unsqueeze(1), st.pos.unsqueeze(1), bias, cache, running.long())[:, 0]  # (B, D)
        first = running & (st.stage == 0)
        if self.router is not None and bool(first.any()):
            probs, log_reach = self.route(h)  # (B, K+1) each
            st.probs = torch.where(first.unsqueeze(1), probs, st.probs)
            st.log_reach = torch.where(first.unsqueeze(1), log_reach, st.log_reach)
            st.depth = torch.where(first, slots.prune_depth(log_reach.unsqueeze(1), tau)[:, 0], st.depth)
        st.hs[rows, st.stage] = torch.where(running.unsqueeze(1), h, st.hs[rows, st.stage])
        done = running & (st.stage == st.depth)
        more = running & ~done
        st.stage = torch.where(more, st.stage + 1, st.stage)
        nxt = h  # a latent thought takes the slot's hidden state; a pause slot its learned embedding
        if self.pause_embed is not None:
            nxt = self.pause_inputs().to(h.dtype)[(st.stage - 1).clamp_min(0)]  # (B, D)
        st.x = torch.where(more.unsqueeze(1), nxt, st.x)
        return done

    def mix_slots(self, st: SlotState, rows: Tensor | slice, width: int | None = None) -> Tensor:
        """Output hidden state of the tokens of ``rows`` from their first ``width`` slot hiddens
        (default all K+1; slots beyond a token's depth carry no weight). Returns (n, D)."""
        width = self.cfg.slots_per_token if width is None else width
        depth = st.depth[rows]
        keep = slots.depth_keep(depth.unsqueeze(1), width)  # (n, 1, width)
        probs = st.probs[rows].unsqueeze(1) if self.router is not None else None
        return self.mix(st.hs[rows, :width].unsqueeze(1), probs, keep)[:, 0]

    def ponder_tokens(
        self, x: Tensor, pos: Tensor, active: Tensor, cache: KVCache | RoundCaches, tau: float
    ) -> TokenStep:
        """The exact recurrence for one token per row, appending its computed slots to the cache.

        Slot methods run :meth:`advance_slots` until every active row's token is complete (a call
        per slot of the deepest row); round methods run their K+1 rounds, one slot per round, each
        in its own cache. Rows with ``active`` False (padding, finished sequences) add nothing.

        Args: x (B, D) token slot inputs; pos (B,) positions; active (B,) bool; tau threshold.
        """
        if self.cfg.n_rounds > 1:
            return self._round_tokens(x, pos, active, cache)
        st = self.new_slot_state(x.shape[0], x.device, x.dtype)
        st.x, st.pos = x, pos
        st.depth = st.depth * active
        running = active.clone()
        while True:
            running = running & ~self.advance_slots(st, running, cache, tau)
            if not bool(running.any()):
                break
        width = int(st.depth.max()) + 1  # the slots any row computed
        h_hat = self.mix_slots(st, slice(None), width)
        if self.router is None:
            return TokenStep(h_hat, st.depth)
        return TokenStep(h_hat, st.depth, st.probs, st.log_reach)

    def _round_tokens(self, x: Tensor, pos: Tensor, active: Tensor, cache: RoundCaches) -> TokenStep:
        """Round methods: K+1 slots per token, one per round, each appended to its round's cache."""
        cfg, e = self.cfg, x
        pos = pos.view(-1, 1)
        for r in range(cfg.n_rounds):
            last = r == cfg.n_rounds - 1
            h = self.stack(x.unsqueeze(1), pos, None, cache[r], active.long(), cfg.round_ends_in_norm(last))[:, 0]
            x = self._next_round_input(e, h, last)
        return TokenStep(x, cfg.max_depth * active.long())

    def extend(
        self,
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
        self.check_input_ids(input_ids)
        tau = check_tau(self.cfg.tau if tau is None else tau)
        B, L = input_ids.shape
        dev = input_ids.device
        active = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        start = cache.next_pos if cache.next_pos is not None else torch.zeros(B, dtype=torch.long, device=dev)
        pos = start.view(B, 1) + (active.long().cumsum(-1) - active.long())  # (B, L) real tokens count on
        if int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence exceeds max_seq_len {self.cfg.max_seq_len}")
        e = self.embed(input_ids)  # (B, L, D)
        steps = [self.ponder_tokens(e[:, i], pos[:, i], active[:, i], cache, tau) for i in range(L)]
        cache.next_pos = start + active.long().sum(-1)
        hidden = torch.stack([s.hidden for s in steps], dim=1)  # (B, L, D)
        out = PonderOutput(
            logits=self.lm_head(hidden).masked_fill(~active.unsqueeze(-1), 0.0) if with_logits else None,
            depth=torch.stack([s.depth for s in steps], dim=1).float(),
            hidden=hidden,
        )
        if self.router is not None:
            out.router_probs = torch.stack([s.router_probs for s in steps], dim=1)
            out.log_reach = torch.stack([s.log_reach for s in steps], dim=1)
        return out

    def resolve_prefill(self, how: str) -> str:
        """The prompt computation for decoding: "exact" (the recurrence), "parallel" (J hard-pruned
        Jacobi passes, the cache filled from the final pass) or "converged" (parallel passes until
        the latents stop changing - :data:`PREFILL_TOL` - with a cap and a fallback to exact);
        "auto" is converged when the parallel computation only approximates the recurrence (latent
        feedback: the recurrence to that tolerance, several times faster than exact), parallel
        otherwise (where the two coincide)."""
        if how == "auto":
            return "converged" if self.cfg.uses_jacobi else "parallel"
        if how not in ("exact", "parallel", "converged"):
            raise ValueError(f"prefill must be 'auto', 'exact', 'parallel' or 'converged', got {how!r}")
        return how

    def prefill(
        self,
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
        :meth:`extend` / :meth:`advance_slots`. ``how``: see :meth:`resolve_prefill`;
        ``capacity``: cache slots to reserve (it grows as needed)."""
        self.check_input_ids(input_ids)
        how = self.resolve_prefill(how)
        tau = check_tau(self.cfg.tau if tau is None else tau)
        B, T = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None else None
        cache = self.new_cache(B, capacity=capacity or T * self.cfg.slots_per_token)
        if how == "exact":
            return self.extend(input_ids, cache, tau=tau, attention_mask=mask, with_logits=with_logits), cache
        tol = PREFILL_TOL if how == "converged" and self.cfg.uses_jacobi else None
        J = jacobi_iters or (PREFILL_MAX_ITERS if tol is not None else self.cfg.jacobi_iters)
        out = self._parallel(input_ids, "hard", tau, J, mask, cache, tol=tol, with_logits=with_logits)
        if tol is not None and not out.converged:  # not within the cap: the sequential recurrence instead
            return self.prefill(input_ids, tau=tau, attention_mask=mask, how="exact", capacity=capacity,
                                with_logits=with_logits)  # fmt: skip
        cache.next_pos = mask.long().sum(-1) if mask is not None else torch.full_like(input_ids[:, 0], T)
        return out, cache

    def _exact(
        self, input_ids: Tensor, tau: float, token_mask: Tensor | None, with_logits: bool = True
    ) -> PonderOutput:
        out, cache = self.prefill(input_ids, tau=tau, attention_mask=token_mask, how="exact", with_logits=with_logits)
        out.cache = cache
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs):
        """Prefill + decode with hard pruning; see :func:`ponderlm.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
