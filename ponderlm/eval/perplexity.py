"""Perplexity with realised depth and inference FLOPs, in any mode.

Every number here is reported next to the compute that produced it: inference FLOPs per token
(``ponderlm.model.flops``, from the realised depths) and the depth histogram. With token labels (a
``ponderlm data synthetic`` dataset) the same numbers are also summed per class of the predicted
token (:func:`score_batch_by_class`, :func:`summarize_classes`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ponderlm.eval.ablations import ablation_depths
from ponderlm.eval.head import head_chunks
from ponderlm.eval.stats import spearman
from ponderlm.model import flops as flops_mod
from ponderlm.model.model import PonderLM

# layout of the accumulator returned by score_batch
CE, TOKENS, FLOPS, DEPTH, HIST = 0, 1, 2, 3, 4
# layout of one row (one class) of the per-class table returned by class_sums
C_TOKENS, C_CE, C_CORRECT, C_DEPTH, C_HIST = 0, 1, 2, 3, 4
ANSWER = re.compile(r"answer-(\d+)")  # the class of a token determined after d steps (docs/SYNTHETIC.md)


def _forward(model, x: torch.Tensor, *, mode: str, tau=None, jacobi_iters=None, jacobi_tol=None, ablation=None,
             generator=None):  # fmt: skip
    """The model's output on x (B, T) in the scoring computation (see :func:`score_batch`). A bare
    PonderLM returns no logits (the head runs in :func:`_token_losses`, a chunk at a time); a
    wrapped module (DDP/FSDP/compiled) runs its head in its forward, over every position."""
    kw = {"tau": tau} if mode != "soft" else {}
    if isinstance(model, PonderLM):
        kw["with_logits"] = False
    if mode != "exact":
        kw["jacobi_iters"] = jacobi_iters
        kw["jacobi_tol"] = jacobi_tol
    if ablation is not None:  # the same computation with the ablation's depths (hard mode)
        if mode != "hard":
            raise ValueError("ablations run in hard mode")
        kw["depth_override"] = ablation_depths(
            model, x, ablation, tau=tau, jacobi_iters=jacobi_iters, generator=generator
        )
    return model(x, mode=mode, **kw)


def _token_losses(model, out, y: torch.Tensor, correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of each target y (B, T) under ``out``, in float32: (B*T,), and with ``correct``
    whether it is the argmax (B*T,). From ``out.logits`` if the forward made them, else from the
    head applied to ``out.hidden`` :func:`head_chunks` by chunk (never (B, T, vocab) logits at once)."""
    target = y.flatten()
    if out.logits is not None:
        logits = out.logits.flatten(0, 1)  # (B*T, V)
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return ce, (logits.argmax(-1) == target) if correct else None
    hidden = out.hidden.flatten(0, 1)  # (B*T, D)
    ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    top = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device) if correct else None
    for s, e, logits in head_chunks(model, hidden):
        ce[s:e] = F.cross_entropy(logits.float(), target[s:e], reduction="none")
        if correct:
            top[s:e] = logits.argmax(-1) == target[s:e]
    return ce, top


def _realised(cfg, mode: str) -> bool:
    """Whether the depths are whole steps (hard/exact, or no router), not soft expectations."""
    return mode != "soft" or not cfg.has_router


def _sums(cfg, out, y: torch.Tensor, mode: str, ce_sum: float) -> torch.Tensor:
    """The accumulator of one batch (layout above) from the model's output and its summed loss."""
    K = cfg.max_depth
    acc = torch.zeros(HIST + K + 1, dtype=torch.float64)
    acc[CE] = ce_sum
    acc[TOKENS] = y.numel()
    acc[DEPTH] = float(out.depth.float().sum())
    if _realised(cfg, mode):
        depth = out.depth.round().long().cpu()
        acc[FLOPS] = flops_mod.inference_flops(cfg, depth).total
        acc[HIST:] = torch.bincount(depth.flatten(), minlength=K + 1).double()
    return acc


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
    out = _forward(model, x, mode=mode, tau=tau, jacobi_iters=jacobi_iters, jacobi_tol=jacobi_tol,
                   ablation=ablation, generator=generator)  # fmt: skip
    if out.logits is not None:  # a wrapped module: its logits, as training's validation always scored them
        ce = float(F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
    else:
        ce = float(_token_losses(model, out, y)[0].double().sum())
    return _sums(cfg, out, y, mode, ce)


@torch.no_grad()
def score_batch_by_class(
    model: torch.nn.Module,
    cfg,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    mode: str,
    **scoring,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_batch` plus the same sums per class of the target token.

    Args: labels (B, T) class id of each *target* y[b, t]: the logits at position t predict
    y[b, t], and the depth spent at t is the computation that prediction used, so the loss,
    accuracy and depth at t all count for the class of y[b, t].
    Returns score_batch's accumulator (its loss summed from the per-token losses, so the class
    sums add up to it) and :func:`class_sums` (n_classes, 4 + K + 1). ``scoring``: score_batch's
    keyword arguments (tau, jacobi_iters, jacobi_tol, ablation, generator).
    """
    out = _forward(model, x, mode=mode, **scoring)
    ce, correct = _token_losses(model, out, y, correct=True)  # (B*T,) each
    ce = ce.double()
    acc = _sums(cfg, out, y, mode, float(ce.sum()))
    by_class = class_sums(labels.flatten(), ce, correct, out.depth.flatten(), n_classes, cfg.max_depth,
                          histogram=_realised(cfg, mode))  # fmt: skip
    return acc, by_class


def class_sums(labels: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor, depth: torch.Tensor,
               n_classes: int, K: int, *, histogram: bool = True) -> torch.Tensor:  # fmt: skip
    """Sums per class over scored positions.

    Args: labels (N,) class id of each position's target; loss (N,) its -log p(target);
    correct (N,) bool, argmax of the logits == target; depth (N,) the depth spent at the position.
    Returns (n_classes, 4 + K + 1) float64, row c = [tokens, loss_sum, correct, depth_sum,
    hist_0..hist_K] (the histogram of realised depths; zeros when ``histogram`` is False).
    """
    labels = labels.long().cpu()
    cols = torch.stack([torch.ones_like(loss, dtype=torch.float64), loss.double(), correct.double(),
                        depth.double()], 1).cpu()  # (N, 4)  # fmt: skip
    out = torch.zeros(n_classes, C_HIST + K + 1, dtype=torch.float64)
    out[:, :C_HIST].index_add_(0, labels, cols)
    if histogram:
        cell = labels * (K + 1) + depth.round().long().cpu()  # (N,) index of (class, depth)
        out[:, C_HIST:] = torch.bincount(cell, minlength=n_classes * (K + 1)).view(n_classes, K + 1).double()
    return out


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


def summarize_classes(sums: torch.Tensor, classes: list[str]) -> dict:
    """Per-class metrics from :func:`class_sums` (row i names ``classes[i]``).

    Returns {"classes": {name: {"tokens", "loss", "acc", "mean_depth", "depth_hist"}}, "difficulty":
    :func:`difficulty`}; a class no target belongs to has None for its means.
    """
    per = {}
    realised = float(sums[:, C_HIST:].sum()) > 0  # a histogram of whole depths (not soft expectations)
    for name, row in zip(classes, sums, strict=True):
        n = float(row[C_TOKENS])
        per[name] = {
            "tokens": int(n),
            "loss": float(row[C_CE]) / n if n else None,
            "acc": float(row[C_CORRECT]) / n if n else None,
            "mean_depth": float(row[C_DEPTH]) / n if n else None,
        }
        if realised:
            per[name]["depth_hist"] = [float(v) / n for v in row[C_HIST:]] if n else None
    return {"classes": per, "difficulty": difficulty(sums, classes)}


def difficulty(sums: torch.Tensor, classes: list[str]) -> dict:
    """Does depth follow difficulty? From :func:`class_sums`: over the ``answer-d`` tokens, the
    Spearman correlation of realised depth with d (None when undefined: no answers, one d, or a
    constant depth), and the mean depth on answer, ``free`` and ``syntax`` tokens."""

    answers = [(i, int(m.group(1))) for i, c in enumerate(classes) if (m := ANSWER.fullmatch(c))]
    rows = [i for i, _ in answers]
    K1 = sums.shape[1] - C_HIST
    counts = sums[rows, C_HIST:].round().long().numpy().ravel()  # tokens of each (answer class, depth)
    d = np.repeat(np.repeat([di for _, di in answers], K1), counts)  # one entry per answer token
    depth = np.repeat(np.tile(np.arange(K1), len(answers)), counts)

    def mean_depth(idx: list[int]) -> float | None:
        n = float(sums[idx, C_TOKENS].sum())
        return float(sums[idx, C_DEPTH].sum()) / n if n else None

    other = {name: [classes.index(name)] if name in classes else [] for name in ("free", "syntax")}
    return {
        "answer_tokens": int(sums[rows, C_TOKENS].sum()),
        "spearman_depth_d": spearman(depth, d),
        "mean_depth": {"answer": mean_depth(rows), **{k: mean_depth(v) for k, v in other.items()}},
    }


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
    labels: torch.Tensor | None = None,
    classes: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | list[float]]:
    """Loss/perplexity of (N, L+1) token windows, with mean depth, FLOPs/token and histogram.

    ``ablation`` (:class:`ponderlm.eval.ablations.Ablation`) replaces the router's depths.
    ``labels`` (N, L+1) class ids of the windows' tokens, named by ``classes``, add the
    :func:`summarize_classes` keys: the loss, accuracy and depth at position t count for the
    class of the token they predict, token t + 1. ``progress`` (windows done, N) is called after
    each batch (:class:`ponderlm.eval.meter.Meter`).
    """
    if labels is not None and (classes is None or labels.shape != windows.shape):
        raise ValueError(f"labels {tuple(labels.shape)} must label windows {tuple(windows.shape)}, named by classes")
    device = next(model.parameters()).device
    acc = by_class = None
    model.eval()
    gen = torch.Generator().manual_seed(ablation.seed) if ablation is not None else None
    kw = dict(mode=mode, tau=tau, jacobi_iters=jacobi_iters, jacobi_tol=jacobi_tol, ablation=ablation, generator=gen)
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            if labels is None:
                a = score_batch(model, model.cfg, w[:, :-1], w[:, 1:], **kw)
            else:  # the targets' labels: position t is scored against token t + 1
                a, c = score_batch_by_class(model, model.cfg, w[:, :-1], w[:, 1:], labels[i : i + batch_size, 1:],
                                            len(classes), **kw)  # fmt: skip
                by_class = c if by_class is None else by_class + c
        acc = a if acc is None else acc + a
        if progress is not None:
            progress(min(i + batch_size, len(windows)), len(windows))
    res = summarize(acc)
    if by_class is not None:
        res.update(summarize_classes(by_class, classes))
    return res
