"""Log-likelihood scoring of zero-shot tasks, as lm-evaluation-harness scores them, in the
hard-pruned inference computation at a given tau.

Context/continuation tokenisation follows lm-eval's ``_encode_pair`` (trailing spaces of the
context move to the continuation; the continuation tokens are the tail of encode(context +
continuation)); long inputs are truncated from the left to the model's context; ``acc`` takes the
highest summed log-likelihood, ``acc_norm`` divides it by the choice's length in characters;
LAMBADA reports greedy-match accuracy and the perplexity of the target word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval.head import head_chunks
from ponderlm.eval.tasks import Doc
from ponderlm.model import flops as flops_mod
from ponderlm.model.model import PonderLM


@dataclass
class Scored:
    loglik: float  # sum of log p(continuation tokens | context)
    greedy: bool  # every continuation token is the argmax


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    if not ctx:
        ctx = [tok.eot_id]
    if not cont:  # the context swallowed the continuation's tokens: score it alone
        cont = tok.encode(continuation)
    return ctx, cont


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), each (B, longest), padded on the right (causal attention never
    sees the padding of a row before its last real token)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


@torch.no_grad()
def loglikelihoods(
    model: PonderLM,
    tok: Tokenizer,
    pairs: list[tuple[str, str]],
    *,
    tau: float,
    mode: str = "hard",
    batch_size: int = 16,
    jacobi: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Scored], dict[str, float]]:
    """Score (context, continuation) pairs; returns the scores in input order and compute stats
    (tokens, mean realised depth, inference FLOPs per token over every scored position).
    ``jacobi``: hard mode's ``jacobi_iters`` / ``jacobi_tol`` (default: the model's J).
    ``progress`` (input tokens done, in all) is called after each batch (long inputs go first, so
    tokens, not pairs, are what the time is spent on).

    Builds no autograd graph; the head runs only at the positions that predict a continuation
    token (log-softmax in at least float32), so a batch holds (continuation tokens, vocab) logits,
    not (B, T, vocab)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    L = cfg.max_seq_len
    enc = []  # (full token list, continuation length); input = full[:-1], targets = full[1:]
    for c, x in pairs:
        ctx, cont = encode_pair(tok, c, x)
        full = (ctx + cont)[-(L + 1) :]
        enc.append((full, min(len(cont), len(full) - 1)))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))  # long first: fewer pads
    total, done = sum(len(full) - 1 for full, _ in enc), 0  # input tokens, for progress
    out: list[Scored] = [Scored(0.0, False)] * len(enc)
    n_tok = depth_sum = flops_sum = 0.0
    model.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, mask = _right_padded([enc[i][0][:-1] for i in idx])
        T = ids.shape[1]
        kw = {"tau": tau, "attention_mask": mask.to(device)} if mode != "soft" else {}
        if mode == "hard":
            kw.update(jacobi or {})
        res = model(ids.to(device), mode=mode, with_logits=False, **kw)
        rows, cols, tgt = [], [], []  # the scored positions, row by row, and the tokens they predict
        for r, i in enumerate(idx):
            full, n_cont = enc[i]
            n_in = len(full) - 1
            rows += [r] * n_cont
            cols += range(n_in - n_cont, n_in)  # the positions whose logits predict the continuation
            tgt += full[-n_cont:]
        tgt_t = torch.tensor(tgt, device=device)  # (N,)
        hidden = res.hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, D)
        lp = torch.empty(len(tgt), dtype=torch.promote_types(hidden.dtype, torch.float32))  # log p(target)
        top = torch.empty(len(tgt), dtype=torch.bool)  # the target is the argmax
        for s, e, logits in head_chunks(model, hidden):
            logp = logits.log_softmax(-1)  # (n, V)
            lp[s:e] = logp.gather(-1, tgt_t[s:e, None]).squeeze(-1).cpu()
            top[s:e] = (logp.argmax(-1) == tgt_t[s:e]).cpu()
        realised = res.depth.round().long().cpu() if mode != "soft" else torch.full((len(idx), T), cfg.max_depth)
        del res, hidden  # this batch's activations go before the next batch's forward
        depth = realised * mask
        n_tok += float(mask.sum())
        depth_sum += float(depth.sum())
        flops_sum += flops_mod.inference_flops(cfg, depth, mask).total
        k = 0
        for i in idx:
            n_cont = enc[i][1]
            out[i] = Scored(float(lp[k : k + n_cont].sum()), bool(top[k : k + n_cont].all()))
            k += n_cont
        done += sum(len(enc[i][0]) - 1 for i in idx)
        if progress is not None:
            progress(done, total)
    stats = {"tokens": n_tok, "mean_depth": depth_sum / max(n_tok, 1), "flops_per_token": flops_sum / max(n_tok, 1)}
    return out, stats


def score_task(
    model: PonderLM,
    tok: Tokenizer,
    docs: list[Doc],
    *,
    tau: float,
    mode: str = "hard",
    batch_size: int = 16,
    jacobi: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """acc / acc_norm (multiple choice) or acc / ppl (LAMBADA), with compute stats; ``progress``:
    :func:`loglikelihoods`'."""
    pairs = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations, strict=True)]
    scored, stats = loglikelihoods(model, tok, pairs, tau=tau, mode=mode, batch_size=batch_size, jacobi=jacobi,
                                   progress=progress)  # fmt: skip
    res: dict[str, float] = {"n": float(len(docs))}
    k = 0
    if docs and docs[0].task == "lambada":
        lls = [s.loglik for s in scored]
        res["acc"] = sum(s.greedy for s in scored) / len(scored)
        res["ppl"] = math.exp(-sum(lls) / len(lls))
    else:
        correct = correct_norm = 0
        for d in docs:
            s = scored[k : k + len(d.continuations)]
            k += len(d.continuations)
            lls = [x.loglik for x in s]
            correct += int(max(range(len(lls)), key=lambda j: lls[j]) == d.gold)
            norm = [ll / max(len(t), 1) for ll, t in zip(lls, d.choice_texts, strict=True)]
            correct_norm += int(max(range(len(norm)), key=lambda j: norm[j]) == d.gold)
        res["acc"] = correct / len(docs)
        if docs and docs[0].task != "winogrande":
            res["acc_norm"] = correct_norm / len(docs)
    res.update(stats)
    return res
