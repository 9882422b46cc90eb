"""Inference-time ablations of a trained PonderLM-3 model: who gets the compute?

The same weights, the same hard-pruned computation, only the per-token depths change:

* ``fixed``    every token at depth d (d = 0..K).
* ``random``   the router's own realised depths, shuffled among the tokens of the batch: the
  same depth histogram, hence the same mean depth (iso-FLOPs up to attention context), but an
  allocation that ignores the token.
* ``entropy``  the router's depths re-assigned by the predictive entropy at depth 0
  (``softmax(lm_head(h^(0)))``, known before any pondering, like the router's input): the most
  uncertain token gets the deepest remaining depth. Same histogram again.

If the learned router beats ``random`` and ``entropy`` at equal mean depth, it puts compute
where it helps; if ``fixed`` at the same mean depth matches it, adaptivity buys nothing.
Kept slots keep their ``log w`` key bias and mixture weights exactly as with router pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ABLATIONS = ("fixed", "random", "entropy")


@dataclass(frozen=True)
class Ablation:
    policy: str  # one of ABLATIONS
    depth: int | None = None  # the depth of "fixed"
    seed: int = 0  # the shuffle of "random"

    def __post_init__(self) -> None:
        if self.policy not in ABLATIONS:
            raise ValueError(f"ablation policy must be one of {ABLATIONS}, got {self.policy!r}")
        if (self.policy == "fixed") != (self.depth is not None):
            raise ValueError("a depth is given exactly for the 'fixed' ablation")

    @property
    def label(self) -> str:
        return f"fixed d={self.depth}" if self.policy == "fixed" else self.policy


def allocate(
    policy: str,
    router_depth: Tensor,
    entropy: Tensor | None = None,
    *,
    depth: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-token depths (B, T) for an ablation, from the router's realised depths (B, T).

    random/entropy keep the multiset of router depths over the whole batch and only move them
    between tokens; entropy (B, T) ranks the tokens (highest entropy -> deepest).
    """
    d = router_depth.long()
    if policy == "fixed":
        return torch.full_like(d, int(depth))
    flat = d.flatten()
    if policy == "random":
        perm = torch.randperm(flat.numel(), generator=generator, device="cpu").to(flat.device)
        return flat[perm].view_as(d)
    if policy == "entropy":
        assert entropy is not None
        by_depth = torch.sort(flat, descending=True).values  # deepest first
        rank = torch.argsort(entropy.flatten().float(), descending=True, stable=True)  # most uncertain first
        out = torch.empty_like(flat)
        out[rank] = by_depth
        return out.view_as(d)
    raise ValueError(f"ablation policy must be one of {ABLATIONS}, got {policy!r}")


@torch.no_grad()
def ablation_depths(
    model, x: Tensor, ablation: Ablation, *, tau: float | None, jacobi_iters: int | None, generator=None
) -> Tensor:
    """The depths (B, T) an ablation assigns to the tokens x (B, T) of a PonderLM-3 model."""
    cfg = model.cfg if hasattr(model, "cfg") else model.module.cfg
    if not cfg.has_router:
        raise ValueError(f"ablations need a PonderLM-3 model (a router), got method={cfg.method}")
    if ablation.policy == "fixed":
        if not 0 <= ablation.depth <= cfg.max_depth:
            raise ValueError(f"fixed depth must lie in [0, {cfg.max_depth}], got {ablation.depth}")
        return torch.full_like(x, ablation.depth)
    ref = model(x, mode="hard", tau=tau, jacobi_iters=jacobi_iters, with_logits=False)  # the head only at depth 0
    logp = torch.log_softmax(model.lm_head(ref.token_hidden).float(), dim=-1)  # prediction at depth 0
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return allocate(ablation.policy, ref.depth.round().long(), entropy, generator=generator)
