"""``ponderlm serve``: the OpenAI-compatible HTTP API over the continuous-batching scheduler
(:mod:`ponderlm.serving.scheduler`), which runs in its own process (:mod:`ponderlm.serving.engine`). Needs the
``serve`` extra (FastAPI, uvicorn, httptools, uvloop).

This process never touches the model: a request is validated, its prompt tokenized and checked
against the context, and a :class:`~ponderlm.serving.scheduler.Request` sent to the engine; the engine's
messages (a step's tokens, in one message) are read on the event loop and put into the requests'
asyncio queues. Text is decoded here, incrementally (an incomplete UTF-8 sequence or a possible
start of a stop string is held back), and a stop string found in it cancels the row.

What a client controls is bounded before it costs anything (docs/SERVING.md, "Limits"): the body is
read at most ``--max-body-bytes`` bytes (413 beyond; a declared ``Content-Length`` beyond is refused
before reading) within ``--request-timeout`` seconds (408); the request line and headers are bounded
too (:data:`MAX_HEAD_BYTES`, 431; ``--request-timeout``, 408), in uvicorn's protocol
(:func:`bounded_protocol`), where they are read; a prompt longer than could fit in the
context is refused by its length in characters before it is tokenized (every token covers at most
:func:`longest_token` characters), and tokenizing runs in a worker thread (the tokenizer releases
the interpreter lock there), so a large prompt does not stall the streams in flight. Text fields
must be encodable text (a lone surrogate is a 400). An unexpected exception in a handler is a 500
in OpenAI's shape and one line on stderr; the server goes on serving.

Extensions to OpenAI's shapes: every choice (and every streamed chunk) carries ``ponder_depths``,
the realised ponder steps of each generated token it covers, and ``usage`` adds ``flops`` (the
request's inference FLOPs at its realised depths) and ``completion_flops`` (those beyond the prompt).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ponderlm.errors import EngineError
from ponderlm.serving import scheduler as batching
from ponderlm.serving.engine import Engine
from ponderlm.serving.http import MAX_BODY_BYTES, REQUEST_TIMEOUT, bounded_protocol, guard
from ponderlm.serving.protocol import (
    CHAT_STOP,
    ApiError,
    BodyBase,
    ChatBody,
    CompletionBody,
    Stream,
    chat_prompt,
    check_text,
    error_body,
    finish_reason,
    stop_strings,
    usage,
)
from ponderlm.serving.scheduler import Finished, QueueFull, Token

API_KEY_ENV = "PONDERLM_API_KEY"


@dataclass
class ServerSettings:
    model_id: str  # the name /v1/models lists and requests must use
    context: int  # the model's max_seq_len
    api_key: str | None = None  # Bearer key every request must carry (None: no check)
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default); chat: the rest of the context
    max_body_bytes: int = MAX_BODY_BYTES  # a larger request body is refused (413) and not read further
    request_timeout: float = REQUEST_TIMEOUT  # seconds to receive the head, and the body (408 beyond)
    token_chars: int = 64  # the most characters one token covers (longest_token): bounds a prompt before tokenizing

    @property
    def max_prompt_chars(self) -> int:
        """A prompt of more characters than this cannot fit in the context: refused before tokenizing."""
        return self.context * self.token_chars


def longest_token(tok) -> int:
    """The most characters of text one token of ``tok`` can stand for: the longest entry of its
    vocabulary (a byte-level entry has one character per byte, and a byte is at most one character
    of text; added tokens match their own text). So a text of more than ``n * longest_token``
    characters encodes to more than n tokens, whatever it is (unless the tokenizer's normaliser
    merges or drops characters, as NFC composes combining marks: such rare texts are refused all
    the same)."""
    return max(1, max((len(t) for t in tok.tk.get_vocab(with_added_tokens=True)), default=1))


# ---------------------------------------------------------------------------------------------- request bodies


# ---------------------------------------------------------------------------------------------- one generation


# ---------------------------------------------------------------------------------------------- the app
class Api:
    """The endpoints' work, on the event loop: validate, queue, turn the scheduler's events into responses."""

    KNOWN = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, engine: Engine, tok, settings: ServerSettings) -> None:
        self.engine, self.tok, self.s = engine, tok, settings
        self.counters: dict[tuple[str, int], int] = {}  # (path, status) -> requests
        # tokenizing off the event loop: two at a time (more would take cores from the engine)
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ponderlm-tokenize")

    def count(self, path: str, status: int) -> None:
        key = (path if path in self.KNOWN else "other", status)  # bounded label values
        self.counters[key] = self.counters.get(key, 0) + 1

    def models(self) -> dict:
        info = self.engine.info
        ponder = {"method": info.method, "max_depth": info.max_depth, "tau": info.tau}
        card = {"id": self.s.model_id, "object": "model", "created": 0, "owned_by": "ponderlm",
                "max_model_len": self.s.context, "ponder": ponder}  # fmt: skip
        return {"object": "list", "data": [card]}

    def max_tokens(self, body: BodyBase, n_prompt: int, chat: bool) -> int:
        """The completion length asked for (default: 16 for completions, the rest of the context for
        chat), refused with a 400 naming the context when it does not fit."""
        ctx = self.s.context
        room = ctx - n_prompt
        n = body.max_tokens
        if n is None:
            n = min(self.s.default_max_tokens, room) if not chat else room
        if room < 1 or n > room:
            param = "max_tokens" if room >= 1 else ("messages" if chat else "prompt")
            raise ApiError(400, f"this model's context is {ctx} tokens: the prompt has {n_prompt} and max_tokens "
                                f"asks for {n}; shorten the prompt or lower max_tokens", param=param,
                           code="context_length_exceeded")  # fmt: skip
        return n

    async def tokenize(self, prompt: str) -> list[int]:
        """The prompt's ids, computed in a worker thread: ``encode_batch`` releases the interpreter
        lock while it works (``encode`` holds it), so the event loop goes on streaming."""
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self.tokenizer_pool, self.tok.encode_batch, [prompt]))[0]

    async def serve(self, request: Request, body: BodyBase, prompt: str, stops: list[str], chat: bool):
        if body.model != self.s.model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.s.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        field = "messages" if chat else "prompt"
        limit = self.s.max_prompt_chars
        if len(prompt) > limit:  # bounded before any work proportional to it
            raise ApiError(400, f"this model's context is {self.s.context} tokens, which no prompt of more than "
                                f"{limit} characters fits; the prompt has {len(prompt)}", param=field,
                           code="context_length_exceeded")  # fmt: skip
        ids = await self.tokenize(prompt) if prompt else []
        if not ids:
            raise ApiError(400, "the prompt is empty", param=field)
        max_tokens = self.max_tokens(body, len(ids), chat)
        events: asyncio.Queue = asyncio.Queue()  # filled on the event loop by _dispatch

        req = batching.Request(ids, max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                               ignore_eos=body.ignore_eos, on_event=events.put_nowait)  # fmt: skip
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry later", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineError as e:
            raise ApiError(503, f"the server cannot generate: {e}", kind="server_error",
                           code="engine_down") from None  # fmt: skip
        out = _Out(rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                   model=self.s.model_id, chat=chat)  # fmt: skip
        stream = Stream(self.tok, stops)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            gen = _sse(req, events, stream, out, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, req, events, stream, out)


@dataclass
class _Out:
    """What every response object of one request repeats."""

    rid: str
    created: int
    model: str
    chat: bool

    def obj(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str, depths: list[int], reason: str | None, role: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None, "ponder_depths": depths}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        else:
            choice["text"] = text
        return self.obj([choice], chunk=True)


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _drain(events: asyncio.Queue, first) -> tuple[list[Token], Finished | None]:
    """``first`` and every event already waiting: the tokens, and the end if it came."""
    toks, ev = [], first
    while True:
        if isinstance(ev, Finished):
            return toks, ev
        toks.append(ev)
        if events.empty():
            return toks, None
        ev = events.get_nowait()


async def _sse(req: batching.Request, events: asyncio.Queue, stream: Stream, out: _Out,
               include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: a chunk per piece of text (with the depths of the tokens it completes),
    the finish reason, usage if asked, ``[DONE]``. A chunk carries every token that arrived since
    the last one: one token while the client keeps up, several when the event loop falls behind
    (fewer, larger writes exactly when writes are the bottleneck). However it ends, the row is
    released."""
    try:
        if out.chat:
            yield _sse_line(out.chunk("", [], None, role=True))
        while True:
            toks, end = _drain(events, await events.get())
            if toks:
                text, depths = stream.push(toks)
                if text or depths:
                    yield _sse_line(out.chunk(text, depths, None))
                if stream.stopped:
                    req.cancel("stop")
            if end is None:
                continue
            if end.reason in ("cancelled", "error") and not stream.stopped:
                yield _sse_line(error_body("the generation was cut short on the server", "server_error"))
                break
            text, depths = stream.flush()
            yield _sse_line(out.chunk(text, depths, finish_reason(end, stream)))
            if include_usage:
                yield _sse_line({**out.obj([], chunk=True), "usage": usage(end, len(stream.ids))})
            break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the server is stopping): the row goes at the next step
        req.cancel()


async def _until_disconnect(receive, req: batching.Request) -> None:
    """Wait for the client to go away (the server's ``http.disconnect``), then cancel the row."""
    while (await receive())["type"] != "http.disconnect":
        pass
    req.cancel()


async def _whole(request: Request, req: batching.Request, events: asyncio.Queue, stream: Stream, out: _Out):
    """The whole completion as one response. A task watches the connection meanwhile: a client
    that disconnects cancels its row at once (the next step drops it), however busy the row is."""
    watch = asyncio.create_task(_until_disconnect(request.receive, req))
    try:
        while True:
            toks, end = _drain(events, await events.get())
            if toks:
                stream.push(toks)
                if stream.stopped:
                    req.cancel("stop")
            if end is not None:
                ev = end
                break
    finally:
        watch.cancel()
        req.cancel()
    if watch.done() and not watch.cancelled() and watch.exception() is None and not stream.stopped:  # client gone
        return PlainTextResponse("", status_code=499)
    if ev.reason in ("cancelled", "error") and not stream.stopped:
        raise ApiError(500, "the generation was cut short on the server", kind="server_error")
    stream.flush()
    choice = {"index": 0, "finish_reason": finish_reason(ev, stream), "logprobs": None, "ponder_depths": stream.depths}
    if out.chat:
        choice["message"] = {"role": "assistant", "content": stream.sent}
    else:
        choice["text"] = stream.sent
    return {**out.obj([choice], chunk=False), "usage": usage(ev, len(stream.ids))}


def create_app(engine: Engine, tok, settings: ServerSettings, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app over a started engine, which it reads on its event loop and stops at the
    end (``on_ready`` once it serves)."""
    api = Api(engine, tok, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.attach(asyncio.get_running_loop())
        if on_ready is not None:
            on_ready()
        yield
        engine.stop(timeout=10.0)
        api.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ponderlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    guard(app, settings.api_key, settings.max_body_bytes, settings.request_timeout, api.count)

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return JSONResponse({"status": "error", "reason": engine.dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, api.counters), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_text(body.prompt, "prompt")
        return await api.serve(request, body, body.prompt, stop_strings(body.stop), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        for i, m in enumerate(body.messages):
            check_text(m.content, f"messages.{i}.content")
        prompt = chat_prompt(body.messages)
        return await api.serve(request, body, prompt, [*stop_strings(body.stop), CHAT_STOP], chat=True)

    return app


def metrics_text(engine: Engine, counters: dict) -> str:
    """Prometheus text exposition of the scheduler's counters (as the engine last reported them)
    and the HTTP request counts."""
    s = SimpleNamespace(**{"admitted": 0, "tokens": 0, "depth_sum": 0, "decode_flops": 0.0, "decode_tokens": 0,
                           "steps": 0, "cache_entries": 0, **engine.stats})  # fmt: skip
    waiting = max(0, len(engine.reqs) - s.active)  # in flight here, not (yet) in the batch
    lines = ["# HELP ponderlm_http_requests_total HTTP requests by path and status.",
             "# TYPE ponderlm_http_requests_total counter"]  # fmt: skip
    for (path, status), n in sorted(counters.items()):
        lines.append(f'ponderlm_http_requests_total{{path="{path}",status="{status}"}} {n}')
    finished = "\n".join(f'ponderlm_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(s.finished.items()))
    gauges = [
        ("ponderlm_requests_admitted_total", "counter", "Requests that entered the batch.", s.admitted),
        ("ponderlm_queue_length", "gauge", "Requests waiting for a row.", waiting),
        ("ponderlm_queue_capacity", "gauge", "Requests the queue holds before refusing (429).",
         engine.settings.max_queue),
        ("ponderlm_batch_rows", "gauge", "Rows decoding now.", s.active),
        ("ponderlm_cache_entries", "gauge", "KV cache slots held by the running rows.", s.cache_entries),
        ("ponderlm_generated_tokens_total", "counter", "Generated tokens (EOS excluded).", s.tokens),
        ("ponderlm_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
         engine.tokens_per_second()),
        ("ponderlm_mean_depth", "gauge", "Mean realised ponder depth of the generated tokens.",
         s.depth_sum / s.tokens if s.tokens else 0.0),
        ("ponderlm_flops_per_token", "gauge", "Inference FLOPs per generated token of finished requests.",
         s.decode_flops / s.decode_tokens if s.decode_tokens else 0.0),
        ("ponderlm_slot_steps_total", "counter", "Slot steps (model calls) of the batch.", s.steps),
    ]  # fmt: skip
    lines += ["# HELP ponderlm_requests_finished_total Requests finished, by reason.",
              "# TYPE ponderlm_requests_finished_total counter"] + ([finished] if finished else [])  # fmt: skip
    for name, kind, help_, value in gauges:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
    return "\n".join(lines) + "\n"


def api_key_from_env(given: str | None) -> str | None:
    return given if given is not None else (os.environ.get(API_KEY_ENV) or None)


def run(engine: Engine, tok, settings: ServerSettings, sock, *, shutdown_timeout: float = 30.0) -> int:
    """Serve on the listening socket ``sock`` until SIGTERM or SIGINT, then finish the streams in
    flight (for up to ``shutdown_timeout`` seconds; later ones are cut), stop the scheduler and
    return the exit status: 0 after SIGTERM, 130 after SIGINT (Ctrl-C)."""
    import signal
    import sys

    import uvicorn

    host, port = sock.getsockname()[:2]

    def ready() -> None:
        i = engine.info
        what = f"{i.method}, K={i.max_depth}, tau {i.tau:g}, max batch {i.max_batch}"
        print(f"serving {settings.model_id} ({what}, queue {i.max_queue}) on http://{host}:{port}", flush=True)

    app = create_app(engine, tok, settings, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on", http=bounded_protocol(settings.request_timeout))  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that only notes it
    # turns that into a normal return: exit status 0 after SIGTERM, 130 after Ctrl-C (as every command)
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    server.run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)
    return 130 if signal.SIGINT in stopped_by else 0
