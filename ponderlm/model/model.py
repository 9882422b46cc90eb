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

This module holds the nn.Module (parameters, init, the primitives ``embed``, ``stack``, ``route``,
``mix``, ``new_cache``), ``forward`` and the parallel ``soft``/``hard`` passes. The exact recurrence
lives in ``ponderlm.model.recurrence`` (:func:`~ponderlm.model.recurrence.advance_slots`, one slot
per running row; ``ponder_tokens``, ``extend`` and ``prefill`` build on it); ``exact`` mode, both
schedules of ``ponderlm.model.generate``, the serving scheduler and the transformers adapter use it.
What a method is comes from its capabilities (``ModelConfig.spec``), never from its name. The
loss lives in ``ponderlm.model.losses``; decoding in ``ponderlm.model.generate``; docs/DESIGN.md has the map.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ponderlm.model import recurrence, slots
from ponderlm.model.cache import KVCache, RoundCaches
from ponderlm.model.config import ModelConfig, check_tau
from ponderlm.model.generate import GenerateOutput
from ponderlm.model.generate import generate as _generate
from ponderlm.model.layers import Block, RMSNorm, RotaryEmbedding
from ponderlm.model.recurrence import PREFILL_MAX_ITERS, PREFILL_TOL

Mode = Literal["soft", "hard", "exact"]
MODES = ("soft", "hard", "exact")
# hard-mode arguments of the converged prefill's rule (``recurrence.prefill``): the default scoring of
# evaluation and experiments, so every default number is the recurrence generate runs, to PREFILL_TOL
# (methods without latent feedback are exact in one pass and ignore both)
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
    """The model of every method: parameters, the primitives both computations are built from,
    ``forward`` and the parallel soft/hard passes. The exact recurrence (``forward(mode="exact")``,
    decoding) is ``ponderlm.model.recurrence``; ``generate`` is ``ponderlm.model.generate``."""

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
            return recurrence.exact(self, input_ids, tau, attention_mask, with_logits)
        J = self.cfg.jacobi_iters if jacobi_iters is None else int(jacobi_iters)
        if J < 1:
            raise ValueError(f"jacobi_iters must be >= 1, got {J}")
        if jacobi_tol is not None and not jacobi_tol > 0:
            raise ValueError(f"jacobi_tol must be > 0, got {jacobi_tol}")
        return self.parallel(input_ids, mode, tau, J, attention_mask, depth_override=depth_override, tol=jacobi_tol,
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

    def parallel(
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
        """The parallel computation of ``soft``/``hard`` mode (arguments already checked), the
        final pass's keys and values entering ``cache`` when one is given (a parallel prefill)."""
        cfg = self.cfg
        B, T = input_ids.shape
        e = self.embed(input_ids)  # (B, T, D)
        tok_pos = slots.token_positions(B, T, token_mask, e.device)  # (B, T)
        tok_keep = token_mask.unsqueeze(-1) if (mode == "hard" and token_mask is not None) else None
        if cfg.n_rounds > 1:
            return self._rounds(e, tok_pos, tok_keep, token_mask, cache, with_logits)
        if cfg.n_latent == 0:  # vanilla: one pass over the tokens
            h = self._pass(e.unsqueeze(2), tok_pos, None, tok_keep, cache)  # (B, T, 1, D)
            return self.output(self.mix(h, None, None), torch.zeros(B, T, device=e.device), with_logits=with_logits)

        passes = _SlotPasses(self, e, tok_pos, mode == "hard", tau, token_mask, cache, depth_override)
        return passes.run(J, tol).output(with_logits)

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
            x = self.next_round_input(e, h, last)
        depth = torch.full((B, T), float(cfg.max_depth), device=e.device)
        out = self.output(x, depth, with_logits=with_logits)
        if token_mask is not None:
            if out.logits is not None:
                out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            out.depth = out.depth.masked_fill(~token_mask, 0.0)
        return out

    def next_round_input(self, e: Tensor, h: Tensor, last: bool) -> Tensor:
        """Round output -> next round's input: the residual stream itself (loop) or the expected
        embedding fed back (PonderLM-1). The last round's output is the model's hidden state."""
        if last or self.cfg.spec.round_input == "residual":
            return h
        return self.soft_token_feedback(e, h)

    def output(self, h_hat: Tensor, depth: Tensor, probs=None, log_reach=None, residual=None,
                with_logits: bool = True) -> PonderOutput:  # fmt: skip
        """The output of mixed hidden states h_hat (B, T, D): their logits (unless not wanted) and
        what came with them."""
        return PonderOutput(
            logits=self.lm_head(h_hat) if with_logits else None,
            depth=depth,
            router_probs=probs,
            log_reach=log_reach,
            hidden=h_hat,
            jacobi_residual=residual,
        )

    # ----------------------------------------- inference (ponderlm.model.recurrence)
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

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> GenerateOutput:
        """Prefill + decode with hard pruning: ``generate(self, ...)``, see
        :func:`ponderlm.model.generate.generate` (which sees the model only as an argument)."""
        return _generate(self, input_ids, max_new_tokens, **kwargs)


@dataclass
class _SlotPasses:
    """The parallel computation of slot methods: the pass schedule over the interleaved slots, and
    its state after the latest pass. Each pass computes the first c slots of every token (hard
    mode: only those the previous pass's router keeps); the router on its token slots gives the
    next pass's key bias and, after the last pass, the mixture; every latent then takes the hidden
    state of the slot before it."""

    model: PonderLM
    e: Tensor  # (B, T, D) token slot inputs
    tok_pos: Tensor  # (B, T) token positions
    hard: bool  # prune at tau (or to depth_override) instead of computing every slot
    tau: float
    token_mask: Tensor | None  # (B, T) real tokens, or None (all)
    cache: KVCache | None  # filled by the final pass (a parallel prefill), or None
    depth_override: Tensor | None  # (B, T) depths replacing the router's pruning (hard mode)
    # the state after the latest pass
    h: Tensor | None = None  # (B, T, c, D) slot hidden states
    probs: Tensor | None = None  # (B, T, K+1) router distribution (PonderLM-3)
    log_reach: Tensor | None = None  # (B, T, K+1) key bias of the next pass
    keep: Tensor | None = None  # (B, T, c) slots computed (hard mode)
    residual: Tensor | None = None  # max |change| of the latents in the last refinement
    passes: int = 0  # passes run
    converged: bool = False  # stopped because the latents (and the kept slots) stopped changing

    def run(self, J: int, tol: float | None = None) -> _SlotPasses:
        """Run the pass schedule of J refinements; returns self, in the last pass's state.

        With ``tol``, J is a cap: the refinements stop as soon as no latent changed by more than
        ``tol`` (and, in hard mode, the kept slots stayed the same), then the final pass runs -
        on converged inputs that is the exact recurrence's fixed point, to that tolerance.
        """
        model, e = self.model, self.e
        cfg = model.cfg
        B, T, D = e.shape
        K = cfg.n_latent
        schedule = cfg.pass_schedule(J)  # slots per token of each pass (the FLOPs counter reads the same)
        if model.pause_embed is not None:  # inputs known up front: one exact pass over all slots
            latents = model.pause_inputs().to(e.dtype).expand(B, T, K, D)
        else:  # (B, T, c-1, D): inputs of slots 1..; the staged warm-up starts with none
            latents = e.new_zeros(B, T, K if cfg.jacobi_warmup == "zeros" else 0, D)
        n = cfg.jacobi_grad_passes if cfg.uses_jacobi else 0
        grad_from = len(schedule) - n if n else 0  # truncated backprop: earlier passes build no graph
        p, last = 0, len(schedule) - 1
        while p <= last:
            with torch.no_grad() if p < grad_from else contextlib.nullcontext():
                latents = self._one_pass(latents, schedule[p], p == last)
            self.passes += 1
            if tol is not None and p < last and self._settled(tol):
                self.converged, p = True, last  # the final pass runs on converged inputs
            else:
                p += 1
        return self

    def _settled(self, tol: float) -> bool:
        """The convergence rule: no latent moved by more than ``tol`` in the last full pass and, in
        hard mode, the router now keeps exactly the slots that pass computed."""
        if self.residual is None or float(self.residual) > tol:
            return False
        if not self.hard or self.depth_override is not None or self.log_reach is None:
            return True
        keep = slots.depth_keep(slots.prune_depth(self.log_reach, self.tau), self.keep.shape[-1], self.token_mask)
        return torch.equal(keep, self.keep)

    def _one_pass(self, latents: Tensor, c: int, last: bool) -> Tensor:
        """One pass over the first c slots of every token; updates the state and returns the next
        pass's latent inputs."""
        model, e = self.model, self.e
        B, T, _ = e.shape
        K = model.cfg.n_latent
        x = torch.cat([e.unsqueeze(2), latents[:, :, : c - 1]], dim=2)  # (B, T, c, D)
        if self.hard:
            if self.depth_override is not None:
                depth = self.depth_override
            elif self.log_reach is not None:
                depth = slots.prune_depth(self.log_reach, self.tau)
            else:
                depth = torch.full((B, T), K, device=e.device, dtype=torch.long)
            self.keep = slots.depth_keep(depth, c, self.token_mask)  # (B, T, c)
        cache = self.cache if last else None
        self.h = model._pass(x, self.tok_pos, self.log_reach, self.keep, cache)  # (B, T, c, D)
        if model.router is not None:
            self.probs, self.log_reach = model.route(self.h[:, :, 0])  # bias for the next pass, mix for the last
        if not last:
            latents = self._next_latents(latents)
        return latents

    def _next_latents(self, latents: Tensor) -> Tensor:
        """Every latent takes the hidden state of the slot before it; slots a hard pass did not
        compute keep their old input. Records the largest change (the Jacobi residual)."""
        new = self.h[:, :, : self.model.cfg.n_latent]
        if self.keep is not None:
            old = F.pad(latents, (0, 0, 0, new.shape[2] - latents.shape[2]))
            new = torch.where(self.keep[:, :, : new.shape[2], None], new, old)
        if new.shape[2] == latents.shape[2]:
            with torch.no_grad():
                self.residual = (new - latents).abs().amax()
        return new

    def output(self, with_logits: bool = True) -> PonderOutput:
        """Logits from the last pass: the mixture (or the last slot), with the realised depth
        (hard), the expected depth under the router (soft) or K."""
        model, token_mask = self.model, self.token_mask
        K = model.cfg.n_latent
        B, T = self.h.shape[:2]
        h_hat = model.mix(self.h, self.probs, self.keep)  # (B, T, D)
        if self.hard:
            depth = (self.keep.sum(-1) - 1).clamp_min(0).float()
        elif self.probs is not None:
            depth = self.probs @ torch.arange(K + 1, device=h_hat.device, dtype=self.probs.dtype)  # E[depth]
        else:
            depth = torch.full((B, T), float(K), device=h_hat.device)
        out = model.output(h_hat, depth, self.probs, self.log_reach, self.residual, with_logits)
        out.token_hidden = self.h[:, :, 0]
        out.jacobi_passes, out.converged = self.passes, self.converged
        if token_mask is not None:
            if out.logits is not None:
                out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            out.depth = out.depth.masked_fill(~token_mask, 0.0)
        return out
