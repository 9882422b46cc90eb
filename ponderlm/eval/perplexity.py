"""Perplexity with realised depth and inference FLOPs, in any mode.

Every number here is reported next to the compute that produced it: inference FLOPs per token
(``ponderlm.flops``, from the realised depths) and the depth histogram.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .. import flops as flops_mod
from ..model import PonderLM
from .ablations import ablation_depths

# layout of the accumulator returned by score_batch
CE, TOKENS, FLOPS, DEPTH, HIST = 0, 1, 2, 3, 4


@torch.no_grad()
def score_batch(
    model: torch.nn.Module,
    cfg,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str,
    tau: float | None = None,
    jacobi_iters: int | None = None,
    jacobi_tol: float | None = None,
    ablation=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sums over one batch: [ce_sum, tokens, flops_sum, depth_sum, hist_0..hist_K] (float64).

    ``model`` may be a wrapped module (DDP/FSDP/compiled); ``cfg`` is its ModelConfig. Depth is
    the expected depth for soft PonderLM-3 (no FLOPs/histogram: nothing is pruned there) and
    the realised depth otherwise.
    """
    K = cfg.max_depth
    acc = torch.zeros(HIST + K + 1, dtype=torch.float64)
    kw = {"tau": tau} if mode != "soft" else {}
    if mode != "exact":
        kw["jacobi_iters"] = jacobi_iters
        kw["jacobi_tol"] = jacobi_tol
    if ablation is not None:  # the same computation with the ablation's depths (hard mode)
        if mode != "hard":
            raise ValueError("ablations run in hard mode")
        kw["depth_override"] = ablation_depths(
            model, x, ablation, tau=tau, jacobi_iters=jacobi_iters, generator=generator
        )
    out = model(x, mode=mode, **kw)
    acc[CE] = float(F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
    acc[TOKENS] = y.numel()
    acc[DEPTH] = float(out.depth.float().sum())
    if mode != "soft" or not cfg.has_router:
        depth = out.depth.round().long().cpu()
        acc[FLOPS] = flops_mod.inference_flops(cfg, depth).total
        acc[HIST:] = torch.bincount(depth.flatten(), minlength=K + 1).double()
    return acc


def summarize(acc: torch.Tensor) -> dict[str, float | list[float]]:
    n = float(acc[TOKENS])
    loss = float(acc[CE]) / n
    res: dict[str, float | list[float]] = {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "mean_depth": float(acc[DEPTH]) / n,
    }
    if float(acc[HIST:].sum()) > 0:
        res["flops_per_token"] = float(acc[FLOPS]) / n
        res["depth_hist"] = [float(v) / n for v in acc[HIST:]]
    return res


def perplexity(
    model: PonderLM,
    windows: torch.Tensor,
    *,
    mode: str = "hard",
    tau: float | None = None,
    jacobi_iters: int | None = None,
    jacobi_tol: float | None = None,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    ablation=None,
) -> dict[str, float | list[float]]:
    """Loss/perplexity of (N, L+1) token windows, with mean depth, FLOPs/token and histogram.

    ``ablation`` (:class:`ponderlm.eval.ablations.Ablation`) replaces the router's depths.
    """
    device = next(model.parameters()).device
    acc = None
    model.eval()
    gen = torch.Generator().manual_seed(ablation.seed) if ablation is not None else None
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            a = score_batch(
                model,
                model.cfg,
                w[:, :-1],
                w[:, 1:],
                mode=mode,
                tau=tau,
                jacobi_iters=jacobi_iters,
                jacobi_tol=jacobi_tol,
                ablation=ablation,
                generator=gen,
            )
        acc = a if acc is None else acc + a
    return summarize(acc)
