"""Continuous batching at slot granularity: the scheduler behind ``ponderlm serve``.

One thread owns the model and a batch of running rows, one row per request. Every step it

1. drops the rows whose request was cancelled (the client went away, a stop string was found);
2. admits waiting requests while the batch has room: each prompt is prefilled on its own, as
   :func:`ponderlm.generate.generate` prefills a single prompt (same prefill mode, same capacity),
   its first token is sampled from the last prompt position, and its cache row joins the batch;
3. advances every running row by one slot of its own through :meth:`PonderLM.advance_slots` (the
   slot schedule of ``generate``): a row that completed a token samples the next one and starts it;
4. retires the rows that emitted EOS or reached ``max_tokens``.

A row that leaves takes its keys and values with it (:meth:`KVCache.keep_rows`), so a request's
output depends on its own prompt and sampling settings only, never on what else is in the batch:
greedy output equals ``generate`` on that prompt. Tokens reach the caller through the request's
``on_event`` callback: called on the scheduler thread, or, with a ``deliver`` hook, handed over in
one batch per step (the server passes a step's events to its event loop in one wake-up).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import check_tau
from .flops import inference_flops
from .generate import sample_next
from .model import PonderLM, SlotState


@dataclass
class BatchSettings:
    max_batch: int = 16  # rows decoding at once; later requests wait in the queue
    max_queue: int = 64  # requests waiting for a row; beyond it submit() raises QueueFull
    tau: float | None = None  # pruning threshold (default: the model's)
    prefill: str = "auto"  # the prompt computation, as generate's `prefill` (auto is generate's default)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {self.max_batch}, {self.max_queue}")


@dataclass
class Token:
    """One generated token (never EOS) and the ponder steps spent to produce it."""

    token: int
    depth: int


@dataclass
class Finished:
    """A request's last event."""

    reason: str  # "stop" (EOS), "length" (max_tokens), "cancelled" or "error"
    prompt_tokens: int
    depths: list[int]  # depth of every generated token (EOS included when it ended the row)
    flops: float = 0.0  # inference FLOPs of the request: the prompt and every token fed back
    prompt_flops: float = 0.0


Event = Token | Finished


@dataclass
class Request:
    """One completion: token ids in, events out through ``on_event`` (called on the scheduler thread)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens even past EOS (fixed lengths for load tests)
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)  # set from any thread

    def cancel(self) -> None:
        """Stop generating; the scheduler drops the row (and frees its cache) at its next step."""
        self.cancelled.set()


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


@dataclass
class _Row:
    req: Request
    pick: Callable[[Tensor], Tensor]  # logits (1, V) -> token (1,)
    prompt_depth: list[int]
    depths: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None  # set when the row is done


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
    cache_entries: int = 0  # KV cache slots the batch holds
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(k for t, k in list(self.recent) if now - t <= window)
        return n / window


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
        self.prefill = model.resolve_prefill(settings.prefill)
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
        for row in self.rows:
            row.reason = "cancelled"
            self._finish(row)
        self._retire()
        self._flush()
        while not self.queue.empty():
            self._send(self.queue.get_nowait(), Finished("cancelled", 0, []))
        self._flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug must not take the server down: fail the batch, keep serving
                traceback.print_exc(file=sys.stderr)
                for row in self.rows:
                    row.reason = "error"
                    self._finish(row)
                self._retire()
                self._flush()
                busy = False
            if not busy and self.queue.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    # ------------------------------------------------------------------ the scheduler thread
    def step(self) -> bool:
        """Drop cancelled rows, admit queued requests, advance every row by one slot, retire the
        finished. Returns whether any row is still running."""
        with torch.no_grad():
            for row in self.rows:
                if row.req.cancelled.is_set():
                    row.reason = "cancelled"
                    self._finish(row)
            self._retire()
            while len(self.rows) < self.s.max_batch:
                try:
                    req = self.queue.get_nowait()
                except queue.Empty:
                    break
                if req.cancelled.is_set():
                    self._send(req, Finished("cancelled", len(req.prompt), []))
                    continue
                try:
                    self._admit(req)
                except Exception:  # this request fails; the batch goes on
                    traceback.print_exc(file=sys.stderr)
                    self._send(req, Finished("error", len(req.prompt), []))
            if self.rows:
                self._advance()
            self._retire()
        self._flush()
        return bool(self.rows)

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

    def _admit(self, req: Request) -> None:
        """Prefill one prompt as generate does for a single prompt; sample its first token; the
        row joins the batch unless that token already ends it."""
        model, T = self.model, len(req.prompt)
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)  # (1, T)
        capacity = (T + req.max_tokens) * model.cfg.slots_per_token
        out, cache = model.prefill(ids, tau=self.tau, how=self.prefill, capacity=capacity, with_logits=False)
        row = _Row(req, self._picker(req), prompt_depth=out.depth[0].long().tolist())
        self.stats.admitted += 1
        nxt = row.pick(model.lm_head(out.hidden[:, -1]))  # (1,)
        if self._emit(row, int(nxt), row.prompt_depth[-1]):
            self._finish(row)
            return
        st = model.new_slot_state(1, self.device, self.dtype)
        st.start(torch.zeros(1, dtype=torch.long, device=self.device), model.embed(nxt), torch.full_like(nxt, T))
        if self.cache is None:
            self.cache, self.st = cache, st
        else:
            self.cache.append_rows(cache)
            self.st = self.st.append(st)
        self.rows.append(row)

    def _advance(self) -> None:
        """One slot for every row (the slot schedule); rows that completed a token emit the next."""
        model, st = self.model, self.st
        running = torch.ones(len(self.rows), dtype=torch.bool, device=self.device)
        done = model.advance_slots(st, running, self.cache, self.tau)  # (B,)
        self.stats.steps += 1
        idx = done.nonzero().squeeze(1)  # (n,)
        if idx.numel() == 0:
            return
        depth = st.depth[idx]  # (n,)
        h_hat = st.hs.new_empty(idx.numel(), st.hs.shape[-1])  # (n, D)
        for d in depth.unique().tolist():  # the output mixture over the row's own d+1 slots, as generate's
            sel = (depth == d).nonzero().squeeze(1)
            h_hat[sel] = model.mix_slots(st, idx[sel], d + 1)
        logits = model.lm_head(h_hat)  # (n, V)
        new = logits.argmax(-1)  # (n,) greedy rows; sampling rows draw below, each from its own generator
        rows = [self.rows[i] for i in idx.tolist()]
        for j, row in enumerate(rows):
            if row.req.temperature > 0:
                new[j] = row.pick(logits[j : j + 1])[0]
        for row, tok, d in zip(rows, new.tolist(), depth.tolist(), strict=True):
            if self._emit(row, tok, d):
                self._finish(row)
        st.start(idx, model.embed(new), st.pos[idx] + 1)
        self.stats.recent.append((time.monotonic(), len(rows)))

    def _emit(self, row: _Row, tok: int, depth: int) -> bool:
        """Record a sampled token and hand it over; returns whether the row is done."""
        row.depths.append(depth)
        if self.eos is not None and tok == self.eos and not row.req.ignore_eos:
            row.reason = "stop"
            return True
        row.tokens.append(tok)
        self.stats.tokens += 1
        self.stats.depth_sum += depth
        self._send(row.req, Token(tok, depth))
        if len(row.tokens) >= row.req.max_tokens:
            row.reason = "length"
            return True
        return False

    def _finish(self, row: _Row) -> None:
        """The row's last event, with its FLOPs: the prompt's tokens and every generated token fed
        back (the depth of generated token i is that of the token fed before it)."""
        cfg = self.model.cfg
        fed = torch.tensor([row.prompt_depth + row.depths[1:]], dtype=torch.long)  # (1, T + n - 1)
        prompt = inference_flops(cfg, torch.tensor([row.prompt_depth])).total
        total = inference_flops(cfg, fed).total
        if row.reason in ("stop", "length"):
            self.stats.decode_flops += total - prompt
            self.stats.decode_tokens += len(row.tokens)
        self.stats.finished[row.reason] = self.stats.finished.get(row.reason, 0) + 1
        self._send(row.req, Finished(row.reason, len(row.prompt_depth), list(row.depths), total, prompt))

    def _retire(self) -> None:
        """Remove the rows that are done; their cache rows are released."""
        keep = [i for i, row in enumerate(self.rows) if row.reason is None]
        if len(keep) < len(self.rows):
            if keep:
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                self.cache.keep_rows(idx)
                self.st = self.st.select(idx)
            else:
                self.cache, self.st = None, None
            self.rows = [self.rows[i] for i in keep]
        self.stats.active = len(self.rows)
        self.stats.cache_entries = int(self.cache.lengths.sum()) if self.cache is not None else 0
