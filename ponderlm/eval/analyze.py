"""``ponderlm analyze``: where does a checkpoint ponder? Per-token realised depth in the hard-pruned
inference computation, against the token's loss and the model's predictive entropy.

This module scores and computes the statistics and writes ``analysis.json`` (every number);
:mod:`ponderlm.eval.depth_render` draws ``depth.html`` (a text coloured by depth, with the
statistics as tables; standalone) and ``depth.png`` (the same at a glance). The statistics are over
validation windows of the checkpoint's dataset, or, for a text given alone (``--text``/``--file``
without ``--windows``), over that text, reading no dataset. On a dataset with token labels
(``ponderlm data synthetic``) they add the depth per class of the predicted token and show a
validation document with each token's class (docs/SYNTHETIC.md, "Evaluating by class").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ponderlm import threads
from ponderlm.data import TokenShards, eval_windows, window_labels
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.errors import ConfigError, DataError
from ponderlm.eval.depth_render import fmt, render_html, render_png
from ponderlm.eval.evaluate import check_results_dir, write_result_files
from ponderlm.eval.head import head_chunks
from ponderlm.eval.meter import Meter
from ponderlm.eval.perplexity import class_sums, summarize_classes
from ponderlm.eval.stats import pearson, spearman
from ponderlm.limits import encode_prefix
from ponderlm.loading import checkpoint_dataset, load_model
from ponderlm.model.config import check_tau
from ponderlm.model.model import CONVERGED, PonderLM
from ponderlm.owned import DirKind, DirLock, read_small_json

ANALYSIS = DirKind("analysis", "an analysis output", frozenset({"analysis.json", "depth.html", "depth.png"}),
                   legacy=lambda d: isinstance(read_small_json(d / "analysis.json"), dict))  # fmt: skip

FILES = ("analysis.json", "depth.html", "depth.png")
MIN_COUNT = 20  # a token needs this many occurrences to enter the deepest/shallowest tables
TOP = 20  # rows in each of those tables
IGNORE = -1  # target id of a position with nothing to predict (the last token of a text)


@torch.no_grad()
def position_stats(model: PonderLM, x: torch.Tensor, y: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """One hard-mode forward -> per-position statistics, each (B*T,) on the CPU.

    Args: x (B, T) input ids; y (B, T) next-token ids, IGNORE where there is none (loss NaN).
    Returns ids (the input token, long), depth (realised steps, long), loss (-log p(y), float64),
    entropy (of the predictive distribution in nats, float64) and correct (bool: argmax == y).
    """
    out = model(x, mode="hard", tau=tau, with_logits=False, **CONVERGED)  # eval's default computation
    hidden, target = out.hidden.flatten(0, 1), y.flatten().clamp_min(0)  # (B*T, D), (B*T,)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    entropy, correct = torch.empty_like(loss), torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for s, e, logits in head_chunks(model, hidden):  # a bounded number of (position, vocab) logits at a time
        logp = logits.log_softmax(-1)
        entropy[s:e] = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
        loss[s:e] = -logp.gather(-1, target[s:e, None]).squeeze(-1)
        correct[s:e] = logits.argmax(-1) == y.flatten()[s:e]
    loss = loss.masked_fill(y.flatten() == IGNORE, float("nan"))
    return {
        "ids": x.flatten().cpu(),
        "depth": out.depth.round().long().flatten().cpu(),
        "loss": loss.double().cpu(),
        "entropy": entropy.double().cpu(),
        "correct": correct.cpu(),
    }


def collect(model: PonderLM, windows: torch.Tensor, tau: float, batch_size: int = 8,
            progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """position_stats over (N, L+1) token windows, in batches: each entry (N*L,). ``progress``
    (windows done, N) is called after each batch (:class:`ponderlm.eval.meter.Meter`)."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        parts.append(position_stats(model, w[:, :-1], w[:, 1:], tau))
        if progress is not None:
            progress(min(i + batch_size, len(windows)), len(windows))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _mean_or_none(total: np.ndarray, count: np.ndarray) -> list[float | None]:
    return [float(t / c) if c else None for t, c in zip(total, count, strict=True)]


def depth_summary(stats: dict[str, torch.Tensor], K: int, tok: Tokenizer) -> dict:
    """Histogram, correlations, per-depth means and the deepest/shallowest frequent tokens. The
    loss statistics are over the positions that have a next token (a text's last has none: its
    loss is NaN); depth and entropy over every position."""
    depth, loss, ent = stats["depth"].numpy(), stats["loss"].numpy(), stats["entropy"].numpy()
    ids = stats["ids"].numpy()
    scored = ~np.isnan(loss)
    l_depth, l_ids, l_loss = (depth, ids, loss) if scored.all() else (depth[scored], ids[scored], loss[scored])
    counts, l_counts = np.bincount(depth, minlength=K + 1), np.bincount(l_depth, minlength=K + 1)
    n = len(depth)
    res = {
        "tokens": n,
        "depth_counts": counts.tolist(),
        "depth_hist": (counts / n).tolist(),
        "mean_depth": float(depth.mean()),
        "mean_loss": float(l_loss.mean()) if len(l_loss) else None,
        "mean_entropy": float(ent.mean()),
        "correlations": {
            "loss": {"pearson": pearson(l_depth, l_loss), "spearman": spearman(l_depth, l_loss)},
            "entropy": {"pearson": pearson(depth, ent), "spearman": spearman(depth, ent)},
        },
        "mean_loss_per_depth": _mean_or_none(np.bincount(l_depth, l_loss, K + 1), l_counts),
        "mean_entropy_per_depth": _mean_or_none(np.bincount(depth, ent, K + 1), counts),
    }
    n_tok = np.bincount(ids)
    mean_d = np.bincount(ids, depth.astype(np.float64)) / np.maximum(n_tok, 1)
    mean_l = np.bincount(l_ids, l_loss, len(n_tok)) / np.maximum(np.bincount(l_ids, minlength=len(n_tok)), 1)
    frequent = np.flatnonzero(n_tok >= MIN_COUNT)

    def table(order: np.ndarray) -> list[dict]:
        return [
            {
                "token": tok.decode([int(t)]),
                "id": int(t),
                "count": int(n_tok[t]),
                "mean_depth": float(mean_d[t]),
                "mean_loss": float(mean_l[t]),
            }
            for t in frequent[order[:TOP]]
        ]

    # lexsort: last key is primary; ties go to the more frequent token
    res["min_count"] = MIN_COUNT
    res["deepest_tokens"] = table(np.lexsort((-n_tok[frequent], -mean_d[frequent])))
    res["shallowest_tokens"] = table(np.lexsort((-n_tok[frequent], mean_d[frequent])))
    return res


def class_summary(stats: dict[str, torch.Tensor], labels: torch.Tensor, classes: list[str], K: int) -> dict:
    """Per-class depth, loss and accuracy (:func:`~ponderlm.eval.perplexity.summarize_classes`, the
    numbers ``ponderlm eval`` reports) of :func:`collect` over windows labelled by ``labels``
    (N, L+1). Position t predicts token t + 1, so its depth, loss and accuracy count for the class
    of token t + 1."""
    target = labels[:, 1:].flatten()  # (N*L,) the class of what each position predicts
    return summarize_classes(class_sums(target, stats["loss"], stats["correct"], stats["depth"], len(classes), K),
                             classes)  # fmt: skip


# ------------------------------------------------------------------ driver
def _val_windows(ck_dir: Path, data_dir: Path | None, seq_len: int,
                 n: int) -> tuple[Path, torch.Tensor, tuple[list[str], torch.Tensor] | None]:  # fmt: skip
    """The validation windows of the checkpoint's dataset (sharing its tokenizer) and, for a
    dataset with token labels, (class names, the windows' class ids), else None."""
    data_dir, meta = checkpoint_dataset(ck_dir, data_dir)
    windows = eval_windows(TokenShards(data_dir, "val"), seq_len, n)
    return data_dir, windows, window_labels(data_dir, meta, "val", seq_len, n)


def _text_positions(model: PonderLM, ids: list[int], tau: float) -> dict[str, torch.Tensor]:
    """:func:`position_stats` of a token sequence's first max_seq_len tokens, each predicting the
    next; the sequence's last token predicts nothing (loss NaN, target IGNORE in ``next``)."""
    T = model.cfg.max_seq_len
    device = next(model.parameters()).device
    x, y = ids[:T], ids[1 : T + 1]
    y = y + [IGNORE] * (len(x) - len(y))  # a text's last token has no next token to score
    s = position_stats(model, torch.tensor([x], device=device), torch.tensor([y], device=device), tau)
    return {**s, "next": torch.tensor(y)}


def _text_tokens(model: PonderLM, tok: Tokenizer, ids: list[int], tau: float,
                 positions: dict[str, torch.Tensor] | None = None) -> list[dict]:  # fmt: skip
    """Per-token depth/loss/entropy of a token sequence (the last one predicts nothing), from
    ``positions`` (:func:`_text_positions` of ``ids``) when given."""
    s = _text_positions(model, ids, tau) if positions is None else positions
    nxt = [tok.decode([i]) if i != IGNORE else None for i in s["next"].tolist()]
    return [
        {"token": tok.decode([i]), "depth": d, "loss": None if math.isnan(lo) else lo, "entropy": e, "next": n}
        for i, d, lo, e, n in zip(
            s["ids"].tolist(), s["depth"].tolist(), s["loss"].tolist(), s["entropy"].tolist(), nxt, strict=True
        )
    ]


WINDOWS = 64  # validation windows scored for the statistics when analyze() is given no text


def analyze(
    checkpoint: str | Path,
    *,
    text: str | None = None,
    data_dir: Path | None = None,
    tau: float | None = None,
    out: Path,
    windows: int | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    log=print,
) -> dict:
    """Depth analysis of a checkpoint at ``tau`` (default: its cfg.tau) in the hard computation.

    Without ``text``: statistics over ``windows`` (default :data:`WINDOWS`) validation windows of
    the checkpoint's dataset (or ``data_dir``), the first of them shown token by token. With
    ``text``: the text is shown and the statistics are the text's own (its positions; the loss
    where a next token follows), and no dataset is read or scored, unless ``windows`` is given:
    then the statistics are over that many validation windows, as without a text. Writes
    analysis.json, depth.html and depth.png under ``out`` (a ponderlm ``analysis`` directory:
    earlier results are replaced only with ``overwrite`` and only when ponderlm wrote them) and
    returns the analysis.json content (``statistics``: "text" or "validation"; ``windows``: 0
    and ``data_dir`` None for the text's own). ``out`` is checked, and locked, before the model is
    loaded. A scoring step longer than 10 s reports its progress and ETA.
    """
    out = Path(out)
    for name, value in (("windows", windows), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if tau is not None:
        check_tau(tau)
    if text is not None:
        from ponderlm.errors import utf8_problem

        why = utf8_problem(text)
        if why:
            raise DataError(f"the text to visualise is {why}")
    if text is None and windows is None:
        windows = WINDOWS
    with DirLock(out, "--out"):
        check_results_dir(out, ANALYSIS, overwrite)  # before the model is loaded and run
        return _analyze(checkpoint, text, data_dir, tau, out, windows, batch_size, device, log)


def _analyze(checkpoint, text, data_dir, tau, out: Path, windows: int | None, batch_size: int, device, log) -> dict:
    """:func:`analyze` once its arguments are checked; ``windows`` None: the text's own statistics."""
    model, tok, ck_dir = load_model(checkpoint, device)
    cfg = model.cfg
    tau = check_tau(cfg.tau if tau is None else tau)
    if text is not None:
        # the first max_seq_len tokens are shown (and the next one scores the last): a long text is
        # tokenized only that far, so its length costs its characters, not gigabytes of tokens
        ids, complete = encode_prefix(tok.encode, text, cfg.max_seq_len + 1)
        source = "given text"
        if not ids:
            raise DataError("the text to visualise is empty after tokenization")
        if len(ids) > cfg.max_seq_len:
            many = len(ids) if complete else f"more than {cfg.max_seq_len}"
            log(f"note: the text has {many} tokens; showing the first {cfg.max_seq_len} (max_seq_len)")
    meta = {"checkpoint": str(ck_dir), "method": cfg.method, "K": cfg.max_depth, "tau": tau}
    log(threads.describe())
    labels = None
    if windows is None:  # the text alone: no dataset is read
        log(f"analyze: {cfg.method} K={cfg.max_depth} tau={tau:g} on the given text (the dataset is not scored: "
            "pass --windows N for statistics over N validation windows)")  # fmt: skip
        positions = _text_positions(model, ids, tau)
        stats = depth_summary({k: v for k, v in positions.items() if k != "next"}, cfg.max_depth, tok)
        where = {"data_dir": None, "windows": 0, "statistics": "text"}
    else:
        data_dir, val, labels = _val_windows(ck_dir, data_dir, cfg.max_seq_len, windows)
        log(f"analyze: {cfg.method} K={cfg.max_depth} tau={tau:g} on {len(val)} validation windows of {data_dir}")
        with Meter(f"analyze: scoring {len(val)} windows", "windows", log, total=len(val)) as meter:
            positions = collect(model, val, tau, batch_size, progress=meter)
        stats = depth_summary(positions, cfg.max_depth, tok)
        if labels is not None:  # a labelled (synthetic) dataset: depth per class of the predicted token
            stats.update(class_summary(positions, labels[1], labels[0], cfg.max_depth))
        where = {"data_dir": str(data_dir), "windows": len(val), "statistics": "validation"}
        if text is None:
            ids, source = val[0].tolist(), "first validation window"  # L+1 tokens: every position has a target
    per_token = _text_tokens(model, tok, ids, tau, positions if windows is None else None)
    text_res = {
        "source": source,
        "tokens": len(per_token),
        "truncated": text is not None and len(ids) > cfg.max_seq_len,
        "mean_depth": sum(t["depth"] for t in per_token) / len(per_token),
        "per_token": per_token,
    }
    if text is None and labels is not None:
        text_res["predicted"] = _predicted(tok, ids, per_token, labels[0], labels[1][0].tolist())
    res = {**meta, **where, **stats, "text": text_res}
    shown = {**meta, "statistics": where["statistics"]}
    files = {"depth.html": render_html(text_res, stats, shown), "depth.png": render_png(text_res, stats, shown),
             "analysis.json": json.dumps(res, indent=2) + "\n"}  # fmt: skip
    write_result_files(out, ANALYSIS, files)
    _log_summary(stats, log)
    log(f"wrote {out / 'analysis.json'}, {out / 'depth.html'}, {out / 'depth.png'}")
    return res


def _predicted(tok: Tokenizer, ids: list[int], per_token: list[dict], classes: list[str],
               labels: list[int]) -> list[dict]:  # fmt: skip
    """The first validation window up to the end of its first document (the first window starts
    one), token by token: its class and the depth and loss of its prediction, made at the
    previous position (None for the window's first token, which nothing in the window predicts)."""
    eot = tok.eot_id
    end = next((j for j in range(1, len(ids)) if ids[j] == eot), len(ids) - 1)  # inclusive
    return [
        {
            "token": tok.decode([ids[j]]),
            "class": classes[labels[j]],
            "depth": per_token[j - 1]["depth"] if j else None,
            "loss": per_token[j - 1]["loss"] if j else None,
        }
        for j in range(end + 1)
    ]


def _log_summary(stats: dict, log) -> None:
    c = stats["correlations"]
    log(
        f"mean depth {stats['mean_depth']:.3f}; histogram "
        + " ".join(f"{d}:{h:.3f}" for d, h in enumerate(stats["depth_hist"]))
        + f"; corr(depth, loss) Pearson {fmt(c['loss']['pearson'])} Spearman {fmt(c['loss']['spearman'])}"
        + f"; corr(depth, entropy) Pearson {fmt(c['entropy']['pearson'])} Spearman {fmt(c['entropy']['spearman'])}"
    )
    if "classes" in stats:
        per = ", ".join(f"{k} {fmt(v['mean_depth'], '.2f')}" for k, v in stats["classes"].items())
        log(f"mean depth per class of the predicted token: {per}; Spearman(depth, d) over answers "
            f"{fmt(stats['difficulty']['spearman_depth_d'])}")  # fmt: skip
