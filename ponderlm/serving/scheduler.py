"""Continuous batching at slot granularity: the scheduler behind ``ponderlm serve``.

One thread (the engine process's, in the server) owns the model and a batch of running rows, one
row per request. Every step it

1. drops the rows whose request was cancelled (the client went away, a stop string was found);
2. admits waiting requests while the batch has room. A prompt that *walks* joins with an empty
   cache row and goes through its tokens inside the batch, one slot per step like every other
   row: the exact recurrence, ``generate(prefill="exact")``. The other prompts admitted at the
   step are prefilled together, left-padded as :func:`ponderlm.model.generate.generate` prefills a
   batch ("converged" or "parallel"; one prompt alone is exactly generate's single-prompt
   prefill), and each samples its first token at once;
3. advances every running row by one slot of its own through :func:`recurrence.advance_slots` (the
   slot schedule of ``generate``): a row that completed a token starts its next prompt token
   (walking) or samples the next token and starts it;
4. retires the rows that emitted EOS or reached ``max_tokens``.

Which prompts walk (``BatchSettings.prefill``): "exact", all; "converged"/"parallel", none; "auto"
(the default), the prompts of latent-feedback methods up to ``walk_max`` tokens. Walking costs a
prompt's slots as extra rows of steps the batch runs anyway, where a prefill at admission stops
every row for its Jacobi passes; a long prompt walks for many steps before its first token, so it
is prefilled instead (docs/SERVING.md). Methods whose one parallel pass is already exact (vanilla,
pause) are prefilled.

A row that leaves releases its keys and values (:meth:`KVCache.keep_rows`). Attention never
crosses rows, so a request's output depends on its own prompt and sampling settings, not on what
else is in the batch, up to floating-point rounding of batched matmuls: greedy output equals
``generate`` on that prompt with the prefill it took. Tokens reach the caller through the
request's ``on_event`` callback: called on the scheduler thread, or, with a ``deliver`` hook,
handed over in one batch per step.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ponderlm.model import recurrence
from ponderlm.model.cache import KVCache
from ponderlm.model.config import check_tau
from ponderlm.model.flops import inference_flops
from ponderlm.model.generate import sample_next
from ponderlm.model.model import PonderLM
from ponderlm.model.recurrence import SlotState
from ponderlm.serving.events import Event, Finished, PromptScores, Request, Token
from ponderlm.serving.scoring import Scorer, token_logprobs


@dataclass
class BatchSettings:
    max_batch: int = 16  # rows decoding at once; later requests wait in the queue
    max_queue: int = 64  # requests waiting for a row; beyond it submit() raises QueueFull
    tau: float | None = None  # pruning threshold (default: the model's)
    prefill: str = "auto"  # "exact" walks every prompt in the batch; "converged"/"parallel" none; see module doc
    walk_max: int = 64  # auto: prompts of latent-feedback methods up to this many tokens walk

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {self.max_batch}, {self.max_queue}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {', '.join(PREFILLS)}, got {self.prefill!r}")
        if self.walk_max < 0:
            raise ValueError(f"walk_max must be >= 0, got {self.walk_max}")


PREFILLS = ("auto", "exact", "converged", "parallel")


SCORE_WAIT = 0.05  # seconds: the longest an idle step waits for a prompt being scored


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


@dataclass
class _Row:
    req: Request
    pick: Callable[[Tensor], Tensor]  # logits (1, V) -> token (1,)
    prompt_depth: list[int]  # depth of each prompt token pondered so far (all of them once generating)
    depths: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None  # set when the row is done
    eos: Token | None = None


@dataclass
class Stats:
    """Counters the metrics endpoint reads (written by the scheduler thread only)."""

    admitted: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by reason
    tokens: int = 0  # generated tokens, EOS excluded
    depth_sum: int = 0  # of those tokens
    decode_flops: float = 0.0  # FLOPs of finished requests beyond their prompts
    decode_tokens: int = 0  # generated tokens of finished requests
    steps: int = 0  # advance_slots calls
    active: int = 0  # rows in the batch
    cache_entries: int = 0  # KV cache slots the batch holds (as of the last counters() call; 0 when empty)


class Scheduler:
    """Owns the model; :meth:`submit` from any thread, :meth:`step` (or :meth:`start`'s thread) decodes."""

    def __init__(
        self,
        model: PonderLM,
        eos_token_id: int | None,
        settings: BatchSettings,
        deliver: Callable[[list[tuple[Request, Event]]], None] | None = None,
    ) -> None:
        if model.cfg.n_rounds > 1:
            raise ValueError(f"method {model.cfg.method!r} decodes by rounds, not slots; serve supports slot methods")
        self.model, self.eos, self.s = model, eos_token_id, settings
        self.tau = check_tau(model.cfg.tau if settings.tau is None else settings.tau)
        how = settings.prefill
        # prompts up to walk_limit tokens walk in the batch; longer ones are prefilled at admission
        auto = settings.walk_max if model.cfg.uses_jacobi else -1
        self.walk_limit = {"exact": sys.maxsize, "auto": auto}.get(how, -1)
        self.prefill = recurrence.resolve_prefill(model, "auto" if how == "exact" else how)  # the prefill at admission
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=settings.max_queue)
        self.rows: list[_Row] = []
        self.cache = None  # KVCache of the rows, None when the batch is empty
        self.st: SlotState | None = None  # slot state of the rows
        self.stats = Stats()
        self.deliver = deliver  # takes a step's (request, event) pairs; None: call each on_event here
        self._out: list[tuple[Request, Event]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scorer = Scorer(model, self.tau, self._wake.set)  # echo with logprobs, beside the steps
        self._ready: list[Request] = []  # scored prompts waiting for a row

    # ------------------------------------------------------------------ any thread
    def submit(self, req: Request) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` requests are waiting."""
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.s.max_queue} requests are waiting") from None
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ponderlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; rows still running and requests still queued get Finished('cancelled')."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with torch.inference_mode():
            for row in self.rows:
                row.reason = "cancelled"
                self._finish(row)
            self._retire()
        self._flush()
        for req in self._scorer.close() + self._ready:
            self._send(req, Finished("cancelled", len(req.prompt), []))
        self._ready = []
        while not self.queue.empty():
            self._send(self.queue.get_nowait(), Finished("cancelled", 0, []))
        self._flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.safe_step()
            if not busy and self.queue.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def safe_step(self) -> bool:
        """:meth:`step`, except that an exception (a bug) fails the rows in the batch, with its
        traceback on stderr, instead of ending the loop: a server goes on serving."""
        try:
            return self.step()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            with torch.inference_mode():
                for row in self.rows:
                    row.reason = "error"
                    self._finish(row)
                self._retire()
            self._flush()
            return False

    # ------------------------------------------------------------------ the scheduler thread
    def step(self) -> bool:
        """Drop cancelled rows, collect scored prompts, admit queued requests, advance every row by
        one slot, retire the finished. Returns whether any row is still running or any prompt is
        being scored or waits for a row once scored.

        The step runs in inference mode (no autograd bookkeeping on any tensor: the same values as
        ``no_grad``, less work per operation); the batch's cache and slot state are inference
        tensors, so everything that changes them runs in it too (:meth:`stop`, :meth:`safe_step`)."""
        with torch.inference_mode():
            for row in self.rows:
                if row.req.cancelled.is_set():
                    row.reason = row.req.cancel_reason
                    self._finish(row)
            self._retire()
            idle = not self.rows and not self._ready and self.queue.empty()
            for req, status, scores, flops in self._scorer.collect(SCORE_WAIT if idle else 0.0):
                self._scored(req, status, scores, flops)
            together: list[Request] = []  # prompts prefilled at admission: in one batch
            while self._ready and len(self.rows) + len(together) < self.s.max_batch:  # scored prompts first
                self._admit(self._ready.pop(0), together)
            # a prompt being scored holds its place in the batch (bounding the scorer's backlog)
            while len(self.rows) + len(together) + len(self._scorer.pending) < self.s.max_batch:
                try:
                    req = self.queue.get_nowait()
                except queue.Empty:
                    break
                if req.cancelled.is_set():
                    self._send(req, Finished("cancelled", len(req.prompt), []))
                elif req.score_prompt:
                    self._scorer.put(req)  # admitted (or finished) once scored: _scored
                else:
                    self._admit(req, together)
            if together:
                self._admit_prefilled(together)
            if self.rows:
                self._advance()
            self._retire()
        self._flush()
        return bool(self.rows or self._ready or self._scorer.pending)

    def _admit(self, req: Request, together: list[Request]) -> None:
        """A request takes a row: its prompt walks, or joins ``together`` (prefilled at this step)."""
        try:
            if self.walk_limit >= len(req.prompt):
                self._admit_walking(req)
            else:
                together.append(req)
        except Exception:  # this request fails; the batch goes on
            traceback.print_exc(file=sys.stderr)
            self._send(req, Finished("error", len(req.prompt), []))

    def _scored(self, req: Request, status: str, scores: PromptScores | None, flops: float) -> None:
        """A prompt came back from the scorer: send its logprobs, then finish it (``max_tokens`` 0, a
        cancel, an error) or queue it for a row ahead of the requests still in the queue."""
        if status == "error":
            self._send(req, Finished("error", len(req.prompt), []))
            return
        if status == "cancelled" or req.cancelled.is_set():
            self._send(req, Finished("cancelled", len(req.prompt), []))
            return
        self._send(req, scores)
        if req.max_tokens == 0:  # only the prompt's logprobs were asked for
            self._send(req, Finished("length", len(req.prompt), [], flops, flops))
            return
        req.score_flops = flops
        self._ready.append(req)

    def _send(self, req: Request, ev: Event) -> None:
        self._out.append((req, ev))

    def _flush(self) -> None:
        """Hand over the events of this step: to ``deliver`` in one batch, or to each on_event."""
        out, self._out = self._out, []
        if not out:
            return
        if self.deliver is not None:
            self.deliver(out)
        else:
            for req, ev in out:
                req.on_event(ev)

    def _picker(self, req: Request) -> Callable[[Tensor], Tensor]:
        """generate's sampling for one row: its own seeded generator (or torch's global one)."""
        gen = torch.Generator(device=self.device).manual_seed(req.seed) if req.seed is not None else None
        top_p = req.top_p if req.top_p is not None and req.top_p < 1.0 else None

        def pick(logits: Tensor) -> Tensor:
            return sample_next(logits, temperature=req.temperature, top_p=top_p, generator=gen)

        return pick

    def _admit_walking(self, req: Request) -> None:
        """The request joins with an empty cache row; its first prompt token starts."""
        model, dev = self.model, self.device
        # its ids are checked here (a prefill checks its own): a bad id met mid-walk would fail the batch
        model.check_input_ids(torch.tensor([req.prompt], dtype=torch.long, device=dev))  # (1, T)
        self.stats.admitted += 1
        row = _Row(req, self._picker(req), prompt_depth=[])
        st = recurrence.new_slot_state(model, 1, dev, self.dtype)
        start = torch.zeros(1, dtype=torch.long, device=dev)
        st.start(start, model.embed(torch.tensor(req.prompt[:1], dtype=torch.long, device=dev)), start)
        self._join([row], st, None, (len(req.prompt) + req.max_tokens) * model.cfg.slots_per_token)

    def _admit_prefilled(self, reqs: list[Request]) -> None:
        """Prefill these prompts together; if that fails, each alone, so a bad request fails by
        itself and the batch goes on."""
        try:
            self._prefill_together(reqs)
        except Exception:
            if len(reqs) == 1:
                traceback.print_exc(file=sys.stderr)
                self._send(reqs[0], Finished("error", len(reqs[0].prompt), []))
                return
            for req in reqs:
                self._admit_prefilled([req])

    def _prefill_together(self, reqs: list[Request]) -> None:
        """One prefill of the prompts, left-padded as ``generate`` prefills a batch (one prompt:
        exactly its single-prompt prefill); each samples its first token and joins the batch
        unless that token already ends it."""
        model, dev = self.model, self.device
        lengths = [len(r.prompt) for r in reqs]
        T = max(lengths)
        rows_ids = [[0] * (T - n) + r.prompt for r, n in zip(reqs, lengths, strict=True)]
        ids = torch.tensor(rows_ids, dtype=torch.long, device=dev)  # (B, T)
        mask = None
        if min(lengths) < T:
            mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths], dtype=torch.bool, device=dev)  # (B, T)
        capacity = max((n + r.max_tokens) * model.cfg.slots_per_token for r, n in zip(reqs, lengths, strict=True))
        out, cache = recurrence.prefill(model, ids, tau=self.tau, attention_mask=mask, how=self.prefill,
                                        capacity=capacity, with_logits=False)  # fmt: skip
        logits = model.lm_head(out.hidden[:, -1])  # (B, V): the last column is real in every row
        depth = out.depth.long().tolist()
        rows, keep, first = [], [], []
        for j, (req, n) in enumerate(zip(reqs, lengths, strict=True)):
            self.stats.admitted += 1
            row = _Row(req, self._picker(req), prompt_depth=depth[j][T - n :])
            nxt = int(row.pick(logits[j : j + 1])[0])
            if self._emit(row, nxt, row.prompt_depth[-1], logits, j):
                self._finish(row)
                continue
            rows.append(row)
            keep.append(j)
            first.append(nxt)
        if not rows:
            return
        if len(keep) < len(reqs):
            cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=dev))
        st = recurrence.new_slot_state(model, len(rows), dev, self.dtype)
        pos = torch.tensor([lengths[j] for j in keep], dtype=torch.long, device=dev)  # (n,)
        st.start(torch.arange(len(rows), device=dev), model.embed(torch.tensor(first, device=dev)), pos)
        self._join(rows, st, cache, capacity)

    def _join(self, rows: list[_Row], st: SlotState, cache: KVCache | None, capacity: int) -> None:
        """The rows go last in the batch, with their prefilled cache rows or (None) empty ones."""
        if self.cache is None:
            self.cache = cache if cache is not None else self.model.new_cache(len(rows), capacity=capacity)
            self.st = st
        else:
            if cache is not None:
                self.cache.append_rows(cache)
            else:
                self.cache.append_empty(len(rows))
            self.st = self.st.append(st)
        self.rows += rows

    def _advance(self) -> None:
        """One slot for every row (the slot schedule). A row that completed a token starts its next
        prompt token (walking) or samples the next token (after its last prompt token, or a
        generated one), emits it and starts it.

        The fixed cost of a step is kept to a few tensor operations whatever the number of rows
        that complete a token: which rows did, and at what depth, comes to Python in one copy."""
        model, st = self.model, self.st
        running = torch.ones(len(self.rows), dtype=torch.bool, device=self.device)  # every row runs a slot
        done = recurrence.advance_slots(model, st, running, self.cache, self.tau)  # (B,)
        self.stats.steps += 1
        marks = torch.where(done, st.depth, -1).tolist()  # each row's depth if its token is complete, else -1
        idx = [i for i, d in enumerate(marks) if d >= 0]
        if not idx:
            return
        nxt = [0] * len(idx)  # each row's next input token
        sample: list[int] = []  # positions in idx of the rows that sample
        rows = self.rows
        for j, i in enumerate(idx):
            row = rows[i]
            prompt, pd = row.req.prompt, row.prompt_depth
            if len(pd) < len(prompt):  # a walked prompt token is complete
                pd.append(marks[i])
                if len(pd) < len(prompt):  # the next one starts
                    nxt[j] = prompt[len(pd)]
                    continue
            sample.append(j)
        if sample:
            emitted = self._sample([idx[j] for j in sample], [marks[idx[j]] for j in sample])
            for j, tok in zip(sample, emitted, strict=True):
                nxt[j] = tok
        at = torch.tensor(idx, dtype=torch.long, device=self.device)  # (n,)
        new = torch.tensor(nxt, dtype=torch.long, device=self.device)  # (n,)
        st.start(at, model.embed(new), st.pos[at] + 1)

    def _sample(self, rows_at: list[int], depths: list[int]) -> list[int]:
        """Rows ``rows_at`` (batch indices) completed the token before their next output, at
        ``depths``: mix each row's own d+1 slots (as generate does), rows of one depth together,
        sample with the row's own sampler, emit. Returns the tokens, in the order of ``rows_at``.

        The rows are taken in order of depth (stable), so their slots are gathered once and each
        depth's rows are a slice of them; the head sees the rows in that order, the samplers and
        the events in batch order."""
        order = sorted(range(len(rows_at)), key=depths.__getitem__)
        h_hat = recurrence.mix_slots_by_depth(
            self.model, self.st, [rows_at[j] for j in order], [depths[j] for j in order]
        )  # (m, D) fmt: skip
        logits = self.model.lm_head(h_hat)  # (m, V), rows in depth order
        new = logits.argmax(-1)  # (m,) greedy rows; sampling rows draw below, each from its own generator
        where = [0] * len(order)  # the row of logits of each of rows_at
        for p, j in enumerate(order):
            where[j] = p
        rows = [self.rows[i] for i in rows_at]
        for j, row in enumerate(rows):  # in batch order, as the draws from torch's generator always were
            if row.req.temperature > 0:
                new[where[j]] = row.pick(logits[where[j] : where[j] + 1])[0]
        got = new.tolist()
        toks = [got[p] for p in where]
        for j, (row, tok, d) in enumerate(zip(rows, toks, depths, strict=True)):
            if self._emit(row, tok, d, logits, where[j]):
                self._finish(row)
        return toks

    def _emit(self, row: _Row, tok: int, depth: int, logits: Tensor, j: int) -> bool:
        """Record a sampled token (from ``logits[j]`` (V,)) and hand it over; returns whether the row is done."""
        req = row.req
        row.depths.append(depth)
        ev = Token(tok, depth)
        if req.logprobs is not None:
            ev.logprob, ev.top = token_logprobs(logits[j], tok, req.logprobs)
        if tok == self.eos and not req.ignore_eos:  # (eos None: no token equals it)
            row.reason = "stop"
            row.eos = ev if req.logprobs is not None else None
            return True
        row.tokens.append(tok)
        stats = self.stats
        stats.tokens += 1
        stats.depth_sum += depth
        self._out.append((req, ev))
        if len(row.tokens) >= req.max_tokens:
            row.reason = "length"
            return True
        return False

    def _finish(self, row: _Row) -> None:
        """The row's last event, with its FLOPs: the prompt's tokens and every generated token fed
        back (the depth of generated token i is that of the token fed before it)."""
        cfg = self.model.cfg
        fed = torch.tensor([row.prompt_depth + row.depths[1:]], dtype=torch.long)  # (1, T + n - 1)
        # a row cancelled while walking its prompt has pondered only part of it (maybe nothing)
        prompt = inference_flops(cfg, torch.tensor([row.prompt_depth])).total if row.prompt_depth else 0.0
        total = inference_flops(cfg, fed).total if fed.numel() else 0.0
        if row.reason in ("stop", "length"):
            self.stats.decode_flops += total - prompt
            self.stats.decode_tokens += len(row.tokens)
        self.stats.finished[row.reason] = self.stats.finished.get(row.reason, 0) + 1
        extra = row.req.score_flops  # the prompt's scoring pass (echo with logprobs)
        self._send(row.req, Finished(row.reason, len(row.req.prompt), list(row.depths), total + extra, prompt + extra,
                                     row.eos))  # fmt: skip

    def _retire(self) -> None:
        """Remove the rows that are done; their cache rows are released."""
        n = sum(row.reason is None for row in self.rows)
        if n < len(self.rows):
            if n:
                # a leaving row's place is taken by a row from the end: only those rows' entries move
                order = list(range(n))
                holes = [i for i in range(n) if self.rows[i].reason is not None]
                tail = [i for i in range(n, len(self.rows)) if self.rows[i].reason is None]
                for h, t in zip(holes, tail, strict=True):
                    order[h] = t
                idx = torch.tensor(order, dtype=torch.long, device=self.device)
                self.cache.keep_rows(idx)
                self.st = self.st.select(idx)
                self.rows = [self.rows[i] for i in order]
            else:
                self.cache, self.st, self.rows = None, None, []
        self.stats.active = len(self.rows)
        if self.cache is None:
            self.stats.cache_entries = 0

    def counters(self) -> Stats:
        """The counters, with the cache's entries counted now (a step leaves them to be counted
        when they are read, not every step)."""
        self.stats.cache_entries = int(self.cache.lengths.sum()) if self.cache is not None else 0
        return self.stats
