"""A prompt's log-probabilities as ``ponderlm eval`` scores them (``echo`` with ``logprobs``, vLLM's
``prompt_logprobs``), a generated token's logprob and top-k, and the thread that scores prompts
beside the scheduler's steps (:class:`Scorer`)."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable

import torch
from torch import Tensor

from ponderlm.model.flops import inference_flops
from ponderlm.model.model import PonderLM
from ponderlm.serving.events import PromptScores, Request


def top_k(logp: Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) of a log-distribution (V,), most likely first."""
    if k <= 0:
        return []
    v, i = logp.topk(min(k, logp.shape[-1]))
    return list(zip(i.tolist(), v.tolist(), strict=True))


def token_logprobs(logits: Tensor, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(tok) and the top-k under the raw distribution of ``logits`` (V,): the log-softmax of
    the model's logits before temperature or top-p (vLLM's default, ``raw_logprobs``), in float32."""
    logp = logits.float().log_softmax(-1)
    return float(logp[tok]), top_k(logp, k)


@torch.no_grad()
def score_prompt(model: PonderLM, prompt: list[int], tau: float, k: int) -> tuple[PromptScores, float]:
    """The log-probabilities of prompt tokens 1..T-1 in ``ponderlm eval``'s scoring computation
    (:func:`ponderlm.eval.zeroshot.loglikelihoods`, the lm-eval adapter's): one hard-pruned forward
    at ``tau`` over the prompt without its last token, Jacobi refined until the latents settle
    (``CONVERGED``), the head at each position (:func:`ponderlm.eval.head.head_chunks`),
    log-softmax in float32. Returns the scores and the FLOPs of that forward."""
    from ponderlm.eval.head import head_chunks
    from ponderlm.model.model import CONVERGED

    if len(prompt) < 2:
        return PromptScores([], []), 0.0
    dev = model.embed_tokens.weight.device
    ids = torch.tensor([prompt[:-1]], dtype=torch.long, device=dev)  # (1, T-1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    res = model(ids, mode="hard", tau=tau, attention_mask=mask, with_logits=False, **CONVERGED)
    tgt = torch.tensor(prompt[1:], dtype=torch.long, device=dev)  # (T-1,)
    lps: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    ranks: list[int] = []
    for s, e, logits in head_chunks(model, res.hidden[0]):
        logp = logits.log_softmax(-1)  # (n, V)
        got = logp.gather(-1, tgt[s:e, None])  # (n, 1)
        lps += got.squeeze(-1).tolist()
        ranks += ((logp > got).sum(-1) + 1).tolist()  # vLLM's prompt_logprobs give each token's rank
        if k > 0:
            v, i = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (n, k)
            tops += [list(zip(a, b, strict=True)) for a, b in zip(i.tolist(), v.tolist(), strict=True)]
        else:
            tops += [[] for _ in range(e - s)]
    flops = inference_flops(model.cfg, res.depth.round().long().cpu()).total
    return PromptScores(lps, tops, ranks), flops


class Scorer:
    """Scores prompts (``echo`` with ``logprobs``: :func:`score_prompt`) on a thread of its own.

    :func:`score_prompt` is one forward over the whole prompt, Jacobi passes to convergence: a long
    prompt takes long, and inside a step it stopped every row decoding meanwhile. It cannot be cut
    into pieces without changing its numbers (the Jacobi solution of a chunk is not bit for bit that
    of the whole), so it runs whole, unchanged, on this thread while the scheduler's steps go on
    (torch leaves the interpreter lock inside its operations): the rows' tokens keep coming, the two
    sharing the process's cores. One prompt at a time, in arrival order; results are collected by
    the scheduler thread (:meth:`collect`), which sends the events."""

    def __init__(self, model: PonderLM, tau: float, wake: Callable[[], None]) -> None:
        self.model, self.tau, self.wake = model, tau, wake
        self.todo: queue.Queue[Request | None] = queue.Queue()
        self.done: queue.Queue[tuple[Request, str, PromptScores | None, float]] = queue.Queue()
        self.pending: list[Request] = []  # handed to the thread and not collected yet (scheduler thread only)
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, req: Request) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ponderlm-scorer", daemon=True)
            self._thread.start()
        self.pending.append(req)
        self.todo.put(req)

    def _run(self) -> None:
        while (req := self.todo.get()) is not None:
            status, scores, flops = "cancelled", None, 0.0
            if not (req.cancelled.is_set() or self._closed):
                try:
                    with torch.inference_mode():
                        dev = self.model.embed_tokens.weight.device
                        self.model.check_input_ids(torch.tensor([req.prompt], dtype=torch.long, device=dev))  # (1, T)
                        scores, flops = score_prompt(self.model, req.prompt, self.tau, req.logprobs or 0)
                    status = "ok"
                except Exception:  # this request fails; the others go on
                    traceback.print_exc(file=sys.stderr)
                    status = "error"
            self.done.put((req, status, scores, flops))
            self.wake()

    def collect(self, wait: float = 0.0) -> list[tuple[Request, str, PromptScores | None, float]]:
        """The prompts scored since the last call, as (request, "ok" | "error" | "cancelled", scores,
        FLOPs); with ``wait``, waits that long for the first one while any is pending."""
        out = []
        if self.pending:
            try:
                out.append(self.done.get(timeout=wait) if wait > 0 else self.done.get_nowait())
                while True:
                    out.append(self.done.get_nowait())
            except queue.Empty:
                pass
        for r in out:
            self.pending.remove(r[0])
        return out

    def close(self) -> list[Request]:
        """End the thread (after the prompt it is scoring, if any); returns the requests not collected."""
        left, self.pending = self.pending, []
        if self._thread is not None and not self._closed:
            self.todo.put(None)
        self._closed = True  # the thread skips what it has not started
        return left
