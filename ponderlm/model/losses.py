"""Training objective: next-token cross-entropy plus PonderLM-3's compute penalty.

The loss never lives inside the model: it takes a ``PonderOutput`` and the targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ponderlm.model.config import ModelConfig
from ponderlm.model.model import PonderOutput


def compute_penalty(expected_depth: Tensor, cfg: ModelConfig) -> Tensor:
    """Penalty on the mean expected depth E[d] (a scalar tensor), normalised by K.

    expected_depth:  lambda * E[d] / K
    target_budget:   lambda * relu(E[d] - target_depth) / K   (a budget on the batch mean)
    """
    K = max(cfg.max_ponder_steps, 1)
    if cfg.penalty == "expected_depth":
        return cfg.penalty_weight * expected_depth / K
    return cfg.penalty_weight * torch.relu(expected_depth - cfg.target_depth) / K


def ponder_loss(
    out: PonderOutput, targets: Tensor, cfg: ModelConfig, *, ignore_index: int = -100
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = CE + penalty.

    Args:
        out: model output; ``out.logits`` (B, T, V) predicts ``targets`` (B, T) position-wise
            (targets are the inputs shifted left by one).
        cfg: supplies the penalty form and weight; only PonderLM-3 is penalised.
    Returns:
        (loss, metrics) -- metrics are detached scalars: ce, penalty, loss, mean_depth and, for
        PonderLM-3, depth_hist/k (mean router probability of depth k over valid targets).
    """
    B, T, V = out.logits.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits' (B, T) {(B, T)}")
    valid = targets != ignore_index  # (B, T)
    n_valid = valid.sum()
    if int(n_valid) == 0:
        raise ValueError("no valid targets: every target equals ignore_index")
    ce = F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
    depth = out.depth.float()
    mean_depth = (depth * valid).sum() / n_valid
    penalty = torch.zeros((), device=ce.device)
    if cfg.has_router and cfg.penalty_weight > 0:
        penalty = compute_penalty(mean_depth, cfg)
    loss = ce + penalty
    metrics = {
        "loss": loss.detach(),
        "ce": ce.detach(),
        "penalty": penalty.detach(),
        "mean_depth": mean_depth.detach(),
    }
    if out.router_probs is not None:
        hist = (out.router_probs.float() * valid.unsqueeze(-1)).sum((0, 1)) / n_valid  # (K+1,)
        for k, v in enumerate(hist.detach()):
            metrics[f"depth_hist/{k}"] = v
    return loss, metrics


def depth_histogram(depth: Tensor, max_depth: int, mask: Tensor | None = None) -> Tensor:
    """Fraction of tokens at each realised depth 0..max_depth. depth (B, T) -> (max_depth+1,)."""
    d = depth.long().flatten()
    if mask is not None:
        d = d[mask.bool().flatten()]
    counts = torch.bincount(d, minlength=max_depth + 1).float()
    return counts / counts.sum().clamp_min(1)
