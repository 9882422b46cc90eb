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

The loss lives in ``ponderlm.losses``; decoding in ``ponderlm.generate``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
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


@dataclass
class PonderOutput:
    logits: Tensor  # (B, T, V)
    depth: Tensor  # (B, T) float: expected steps (soft) or realised steps (hard/exact)
    router_probs: Tensor | None = None  # (B, T, K+1) s_t over depths 0..K (PonderLM-3)
    log_reach: Tensor | None = None  # (B, T, K+1) log w_{t,k}, clamped at log_floor
    hidden: Tensor | None = None  # (B, T, D) mixed final hidden state fed to the head
    token_hidden: Tensor | None = None  # (B, T, D) final hidden state of the token slot, h^(0)
    jacobi_residual: Tensor | None = None  # max |change| of the latents in the last refinement
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
    log_w = (tail - lse).clamp(min=floor)
    log_w = torch.cat([torch.zeros_like(log_w[..., :1]), log_w[..., 1:].clamp(max=0.0)], dim=-1)
    return torch.softmax(router_logits, dim=-1), log_w


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
        self.pause_embed = nn.Embedding(cfg.max_ponder_steps, cfg.d_model) if cfg.method == "pause" else None
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

    def sample_train_jacobi_iters(self, rng: random.Random) -> int:
        """The Jacobi curriculum: J drawn uniformly from cfg.jacobi_train_iters."""
        return rng.choice(self.cfg.jacobi_train_iters)

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
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._check_ids(input_ids)
        if mode == "soft":
            if tau is not None:
                raise ValueError("tau is a hard/exact-mode knob; soft mode never prunes")
            if attention_mask is not None:
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
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            attention_mask = attention_mask.bool()
        if mode == "exact":
            return self._exact(input_ids, tau, attention_mask)
        J = self.cfg.jacobi_iters if jacobi_iters is None else int(jacobi_iters)
        if J < 1:
            raise ValueError(f"jacobi_iters must be >= 1, got {J}")
        return self._parallel(input_ids, mode, tau, J, attention_mask, depth_override=depth_override)

    def _check_ids(self, ids: Tensor) -> None:
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
    ) -> PonderOutput:
        cfg = self.cfg
        B, T = input_ids.shape
        hard = mode == "hard"
        e = self.embed(input_ids)  # (B, T, D)
        tok_pos = slots.token_positions(B, T, token_mask, e.device)  # (B, T)
        tok_keep = token_mask.unsqueeze(-1) if (hard and token_mask is not None) else None
        K = cfg.n_latent
        if cfg.n_rounds > 1:
            return self._rounds(e, tok_pos, tok_keep, token_mask, cache)
        if K == 0:  # vanilla: one pass over the tokens
            h = self._pass(e.unsqueeze(2), tok_pos, None, tok_keep, cache)  # (B, T, 1, D)
            return self._output(self.mix(h, None, None), torch.zeros(B, T, device=e.device))

        # Stage counts per pass: staged warm-up grows 1..K, then J refinements + the final pass.
        if cfg.method == "pause":  # inputs known up front: one exact pass over all slots
            schedule = [K + 1]
            latents = self.pause_inputs().to(e.dtype).expand(B, T, K, e.shape[-1])
        elif cfg.jacobi_warmup == "staged":
            schedule = list(range(1, K + 1)) + [K + 1] * (J + 1)
            latents = e.new_zeros(B, T, 0, e.shape[-1])  # (B, T, c-1, D): inputs of slots 1..
        else:
            schedule = [K + 1] * (J + 1)
            latents = e.new_zeros(B, T, K, e.shape[-1])
        probs = log_w = keep = residual = None
        for p, c in enumerate(schedule):
            last = p == len(schedule) - 1
            x = torch.cat([e.unsqueeze(2), latents[:, :, : c - 1]], dim=2)  # (B, T, c, D)
            if hard:
                if depth_override is not None:
                    depth = depth_override
                elif log_w is not None:
                    depth = slots.prune_depth(log_w, tau)
                else:
                    depth = torch.full((B, T), K, device=e.device, dtype=torch.long)
                keep = slots.depth_keep(depth, c, token_mask)  # (B, T, c)
            h = self._pass(x, tok_pos, log_w, keep, cache if last else None)  # (B, T, c, D)
            if self.router is not None:
                probs, log_w = self.route(h[:, :, 0])  # bias for the next pass, mix for the last
            if not last:  # every latent takes the hidden state of the slot before it
                new = h[:, :, :K]
                if keep is not None:  # slots not computed this pass keep their old input
                    old = F.pad(latents, (0, 0, 0, new.shape[2] - latents.shape[2]))
                    new = torch.where(keep[:, :, : new.shape[2], None], new, old)
                if new.shape[2] == latents.shape[2]:
                    with torch.no_grad():
                        residual = (new - latents).abs().amax()
                latents = new

        h_hat = self.mix(h, probs, keep)  # (B, T, D)
        if hard:
            depth = (keep.sum(-1) - 1).clamp_min(0).float()
        elif probs is not None:
            depth = probs @ torch.arange(K + 1, device=e.device, dtype=probs.dtype)  # E[depth]
        else:
            depth = torch.full((B, T), float(K), device=e.device)
        out = self._output(h_hat, depth, probs, log_w, residual)
        out.token_hidden = h[:, :, 0]
        if token_mask is not None:
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
            h = self._pass(x.unsqueeze(2), tok_pos, None, tok_keep, c, self._round_norm(last))[:, :, 0]  # (B, T, D)
            x = self._next_round_input(e, h, last)
        depth = torch.full((B, T), float(cfg.max_depth), device=e.device)
        out = self._output(x, depth)
        if token_mask is not None:
            out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            out.depth = out.depth.masked_fill(~token_mask, 0.0)
        return out

    def _round_norm(self, last: bool) -> bool:
        """Whether a round ends in the final norm: always for PonderLM-1, only the last for loop."""
        return last or self.cfg.method == "ponderlm1"

    def _next_round_input(self, e: Tensor, h: Tensor, last: bool) -> Tensor:
        """Round output -> next round's input: loop keeps the residual stream, PonderLM-1 feeds back
        the expected embedding. The last round's output is the model's hidden state."""
        if last or self.cfg.method == "loop":
            return h
        return self.soft_token_feedback(e, h)

    def _output(self, h_hat: Tensor, depth: Tensor, probs=None, log_w=None, residual=None) -> PonderOutput:
        return PonderOutput(
            logits=self.lm_head(h_hat),
            depth=depth,
            router_probs=probs,
            log_reach=log_w,
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

    def ponder_token(
        self, x: Tensor, pos: Tensor, active: Tensor, cache: KVCache, tau: float
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The exact recurrence for one token per row, appending its computed slots to the cache.

        Decode order: slot (t,0) from the embedding, the router on its hidden state, then slots
        (t,1..K_hat) each fed the previous slot's hidden state. Rows with ``active`` False
        (padding, finished sequences) add nothing to the cache.

        Args: x (B, D) token slot input; pos (B,) positions; active (B,) bool; tau threshold.
        Returns: h_hat (B, D), depth (B,) long, s (B, K+1) or None, log w (B, K+1) or None.
        """
        cfg = self.cfg
        B = x.shape[0]
        pos = pos.view(B, 1)
        if cfg.n_rounds > 1:  # loop / ponderlm1: one slot per round, each round its own cache
            R, e = cfg.n_rounds, x
            for r in range(R):
                last = r == R - 1
                h = self.stack(x.unsqueeze(1), pos, None, cache[r], active.long(), self._round_norm(last))[:, 0]
                x = self._next_round_input(e, h, last)
            return x, cfg.max_depth * active.long(), None, None
        h = self.stack(x.unsqueeze(1), pos, None, cache, active.long())[:, 0]  # (B, D)
        K = cfg.n_latent
        if K == 0:
            return h, torch.zeros(B, dtype=torch.long, device=x.device), None, None
        probs = log_w = None
        if self.router is not None:
            probs, log_w = self.route(h)  # (B, K+1)
            depth = slots.prune_depth(log_w.unsqueeze(1), tau)[:, 0]  # (B,)
        else:
            depth = torch.full((B,), K, dtype=torch.long, device=x.device)
        depth = depth * active
        hs = [h]
        pause = self.pause_inputs().to(h.dtype) if self.pause_embed is not None else None
        for k in range(1, K + 1):
            step_active = depth >= k  # (B,)
            if not bool(step_active.any()):
                break
            bias = log_w[:, k : k + 1] if log_w is not None else None  # (B, 1)
            inp = pause[k - 1].expand(B, -1) if pause is not None else h  # pause slot or latent thought
            h = self.stack(inp.unsqueeze(1), pos, bias, cache, step_active.long())[:, 0]
            hs.append(h)
        hs = torch.stack(hs, dim=1).unsqueeze(1)  # (B, 1, c, D)
        keep = slots.depth_keep(depth.unsqueeze(1), hs.shape[2])  # (B, 1, c)
        h_hat = self.mix(hs, probs.unsqueeze(1) if probs is not None else None, keep)[:, 0]
        return h_hat, depth, probs, log_w

    def _exact(self, input_ids: Tensor, tau: float, token_mask: Tensor | None) -> PonderOutput:
        B, T = input_ids.shape
        e = self.embed(input_ids)  # (B, T, D)
        active = token_mask if token_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        tok_pos = slots.token_positions(B, T, token_mask, e.device)
        cache = self.new_cache(B, capacity=T * self.cfg.slots_per_token)
        outs = [self.ponder_token(e[:, t], tok_pos[:, t], active[:, t], cache, tau) for t in range(T)]
        h_hat = torch.stack([o[0] for o in outs], dim=1)  # (B, T, D)
        depth = torch.stack([o[1] for o in outs], dim=1).float()  # (B, T)
        probs = log_w = None
        if self.router is not None:
            probs = torch.stack([o[2] for o in outs], dim=1)
            log_w = torch.stack([o[3] for o in outs], dim=1)
        out = self._output(h_hat, depth, probs, log_w)
        out.cache = cache
        if token_mask is not None:
            out.logits = out.logits.masked_fill(~token_mask.unsqueeze(-1), 0.0)
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs):
        """Prefill + decode with hard pruning; see :func:`ponderlm.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
