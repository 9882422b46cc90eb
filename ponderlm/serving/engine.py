"""The model's own process behind ``ponderlm serve``.

The HTTP side (:mod:`ponderlm.serving.api`) and the scheduler (:mod:`ponderlm.serving.scheduler`) are both
Python, and in one process they take turns on the interpreter lock: every streamed token's JSON,
SSE framing and socket write would stall the slot steps, and a model that generates more tokens
per step (PonderLM-3 at a low depth) would pay for it more. So the scheduler runs in a spawned
child process and the server talks to it over a pipe:

* server -> engine: ``("add", id, prompt, max_tokens, temperature, top_p, seed, ignore_eos, logprobs,
  score_prompt)``,
  ``("cancel", id, reason)`` (reason "stop" when the server found a stop string), ``("stop",)``;
* engine -> server: ``("ready", info)`` once the model is loaded (or ``("error", line)``), then
  ``("events", [(id, Token | PromptScores | Finished | (token, depth)), ...], stats)`` after each step that
  produced events (a token without logprobs travels as a plain ``(token, depth)`` tuple: a step of a
  shallow PonderLM-3 emits a token for most rows, and a dataclass costs about 3 us a token to pickle,
  a tuple 0.1 us), with
  the scheduler's counters (``stats``) at most every :data:`STATS_EVERY` seconds while busy and
  whenever the batch empties (None in between), and ``("bye",)`` after a stop.

The server bounds the requests it has in flight (``max_batch + max_queue``; beyond it, 429); the
engine admits them into the batch in order. The engine ignores SIGINT and SIGTERM (the server
stops it with ``("stop",)`` after its own graceful shutdown) and exits when the pipe closes, so
a server killed outright does not leave it behind.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ponderlm.errors import EngineError, UserError
from ponderlm.serving.scheduler import BatchSettings, Finished, QueueFull, Request, Token

STATS_EVERY = 0.1  # seconds: the longest a busy engine goes without reporting its counters


@dataclass
class EngineInfo:
    """What the server needs to know about the model the engine holds."""

    method: str
    max_depth: int
    tau: float
    context: int
    max_batch: int
    max_queue: int


def _stats(sched) -> dict:
    return {**asdict(sched.counters()), "waiting": sched.queue.qsize()}


def _engine_main(conn, checkpoint: str, device: str, settings: BatchSettings) -> None:
    """The child: load the model, then step the scheduler and answer the pipe until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the server, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ponderlm.loading import load_model

    try:
        model, tok, _ = load_model(checkpoint, device)
        sched = engine_scheduler(model, tok.eos_id, settings)  # the model's end of turn, else end of text
    except Exception as e:  # the server already loaded this checkpoint once; report whatever happens
        conn.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)))
        return
    cfg = model.cfg
    conn.send(("ready", EngineInfo(cfg.method, cfg.max_depth, sched.tau, cfg.max_seq_len, settings.max_batch,
                                   settings.max_queue)))  # fmt: skip
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the server went away: so do we
        _EngineLoop(conn, sched).run()


def engine_scheduler(model, eos_token_id: int | None, settings: BatchSettings):
    """The engine's scheduler. Its queue holds everything the server may have in flight
    (``max_batch + max_queue``): a burst of requests can arrive between two steps, before any of
    them took a row, and the server has already bounded it."""
    from ponderlm.serving.scheduler import Scheduler

    return Scheduler(model, eos_token_id, replace(settings, max_queue=settings.max_queue + settings.max_batch))


class _EngineLoop:
    """The child's loop: read the pipe (without waiting while rows run), step, report."""

    def __init__(self, conn, sched) -> None:
        self.conn, self.sched = conn, sched
        self.out: list = []
        sched.deliver = self.out.extend
        self.reqs: dict[int, Request] = {}
        self.stopping = False

    def handle(self, msg) -> None:
        if msg[0] == "add":
            _, rid, prompt, max_tokens, temperature, top_p, seed, ignore_eos, logprobs, score = msg
            req = Request(prompt, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          ignore_eos=ignore_eos, logprobs=logprobs, score_prompt=score, id=rid)  # fmt: skip
            self.reqs[rid] = req
            self.sched.queue.put_nowait(req)  # never full: see engine_scheduler
        elif msg[0] == "cancel":
            if msg[1] in self.reqs:
                self.reqs[msg[1]].cancel(msg[2])
        elif msg[0] == "stop":
            self.stopping = True

    def run(self) -> None:
        sched, last, busy = self.sched, 0.0, False
        while True:
            # busy: rows decoding or prompts being scored (an idle step waits for the scorer itself)
            wait = 0.0 if (busy or sched.rows or not sched.queue.empty()) else 0.5
            while self.conn.poll(wait):
                wait = 0.0
                msg = self.conn.recv()
                try:
                    self.handle(msg)
                except Exception:  # a bug: this request fails, the engine goes on serving the others
                    traceback.print_exc(file=sys.stderr)
                    if msg[0] == "add":
                        self.reqs.pop(msg[1], None)
                        self.out.append((Request(msg[2], msg[3], id=msg[1]), Finished("error", len(msg[2]), [])))
            if self.stopping:
                sched.stop()  # the rows and requests left get Finished("cancelled")
                self.report()
                self.conn.send(("bye",))
                return
            busy = sched.safe_step()
            now = time.monotonic()
            counters = (busy and now - last > STATS_EVERY) or (not busy and last >= 0)
            if self.out or counters:
                self.report(counters)
            if counters:
                last = now if busy else -1.0  # idle: one report, then quiet until the next step

    def report(self, counters: bool = True) -> None:
        events = []
        for req, ev in self.out:
            if type(ev) is Token and ev.logprob is None:
                events.append((req.id, (ev.token, ev.depth)))  # (token, depth): see the module docstring
            else:
                events.append((req.id, ev))
                if isinstance(ev, Finished):
                    self.reqs.pop(req.id, None)
        self.out.clear()
        self.conn.send(("events", events, _stats(self.sched) if counters else None))


class Engine:
    """The server's handle on the engine process: :meth:`submit` requests (their events arrive
    through each request's ``on_event`` on the event loop), read :attr:`stats` for the metrics."""

    def __init__(self, checkpoint: str | Path, device: str, settings: BatchSettings) -> None:
        self.settings = settings
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or torch state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, str(checkpoint), str(device), settings),
                                name="ponderlm-engine", daemon=True)  # fmt: skip
        self._child = child
        self.info: EngineInfo | None = None
        self.reqs: dict[int, Request] = {}
        self._ids = itertools.count()
        self.stats: dict = {"active": 0, "waiting": 0, "finished": {}}
        self.dead: str | None = None  # why the engine is gone, once it is
        self.recent: deque = deque(maxlen=8192)  # (time, tokens) per message, for the rate
        self._loop = None  # the event loop reading the pipe, once attached

    def start(self) -> EngineInfo:
        """Spawn the process and wait until it holds the model; EngineError with its reason otherwise."""
        self.proc.start()
        self._child.close()
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise EngineError(f"the engine process exited at start (status {self.proc.exitcode})") from None
        if msg[0] == "error":
            self.proc.join()
            raise EngineError(msg[1])
        self.info = msg[1]
        return self.info

    def attach(self, loop) -> None:
        """Read the engine's messages on ``loop`` (the server's event loop) as they arrive."""
        loop.add_reader(self.conn.fileno(), self._readable)
        self._loop = loop

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._take(self.conn.recv())
        except (EOFError, OSError):
            self._died("the engine process exited")

    def _take(self, msg) -> None:
        """One message of the engine: a step's events to their requests, and its counters."""
        if msg[0] == "events":
            self._dispatch([(rid, Token(*ev) if type(ev) is tuple else ev) for rid, ev in msg[1]])
            if msg[2] is not None:
                self.stats = msg[2]

    def _dispatch(self, events) -> None:
        tokens = sum(isinstance(ev, Token) for _, ev in events)
        if tokens:
            self.recent.append((time.monotonic(), tokens))
        for rid, ev in events:
            req = self.reqs.get(rid)
            if req is None:
                continue
            if isinstance(ev, Finished):
                del self.reqs[rid]
            req.on_event(ev)

    def _died(self, why: str) -> None:
        """Every request in flight ends with an error; later ones are refused (the server answers 503)."""
        if self.dead is not None:
            return
        self.dead = why
        if self._loop is None:  # stopping: the engine was told to go
            return
        self._loop.remove_reader(self.conn.fileno())
        print(f"error: {why}; the server can no longer generate", file=sys.stderr, flush=True)
        for req in list(self.reqs.values()):
            req.on_event(Finished("error", len(req.prompt), []))
        self.reqs.clear()

    def submit(self, req: Request) -> None:
        """Send a request to the engine (call on the event loop). QueueFull when ``max_batch +
        max_queue`` are in flight; EngineError when the engine is gone."""
        if self.dead is not None:
            raise EngineError(self.dead)
        if len(self.reqs) >= self.settings.max_batch + self.settings.max_queue:
            raise QueueFull(f"{self.settings.max_queue} requests are waiting")
        rid = next(self._ids)
        self.reqs[rid] = req
        req.id = rid
        req.on_cancel = lambda reason: self._send(("cancel", rid, reason))
        self._send(("add", rid, req.prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.ignore_eos,
                    req.logprobs, req.score_prompt))  # fmt: skip

    def _send(self, msg) -> None:
        if self.dead is None:
            try:
                self.conn.send(msg)
            except OSError:
                self._died("the engine process exited")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine to stop (its rows end as cancelled), deliver its last events, wait for it."""
        if self._loop is not None and self.dead is None:
            self._loop.remove_reader(self.conn.fileno())  # from here on this method reads the pipe
        self._loop = None
        if self.dead is None and self.proc.is_alive():
            self._send(("stop",))
            end = time.monotonic() + timeout
            try:
                while time.monotonic() < end and self.conn.poll(max(0.0, end - time.monotonic())):
                    msg = self.conn.recv()
                    if msg[0] == "bye":
                        break
                    self._take(msg)
            except (EOFError, OSError):
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds, as they reached the server."""
        now = time.monotonic()
        return sum(n for t, n in self.recent if now - t <= window) / window
