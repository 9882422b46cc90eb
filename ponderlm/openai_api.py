"""``ponderlm serve``: the OpenAI-compatible HTTP API over the continuous-batching scheduler
(:mod:`ponderlm.batching`), which runs in its own process (:mod:`ponderlm.engine`). Needs the
``serve`` extra (FastAPI, uvicorn, httptools, uvloop).

This process never touches the model: a request is validated, its prompt tokenized and checked
against the context, and a :class:`~ponderlm.batching.Request` sent to the engine; the engine's
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
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import batching
from .batching import Finished, QueueFull, Token
from .engine import Engine, EngineError
from .errors import utf8_problem

API_KEY_ENV = "PONDERLM_API_KEY"
CHAT_ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 4 << 20  # --max-body-bytes default (docs/SERVING.md, "Limits")
REQUEST_TIMEOUT = 30.0  # --request-timeout default: seconds to receive a request's head, and again its body
MAX_HEAD_BYTES = 32 << 10  # the request line and headers of one request; beyond: 431 and the connection closed
MAX_STOP_CHARS = 256  # the longest stop string (each token checks every prefix of every stop string)


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
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as a server without accounts does
    ignore_eos: bool = False  # extension: generate exactly max_tokens tokens (load tests)


class CompletionBody(_Body):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def chat_prompt(messages: list[Message]) -> str:
    """The plain chat template (ponderlm's models are base models without one): each message as
    ``Role: content`` followed by a blank line, then ``Assistant:`` for the reply. ``\\n\\nUser:`` is
    an implicit stop string, so the reply ends where the model starts the next user turn."""
    turns = "".join(f"{m.role.capitalize()}: {m.content}\n\n" for m in messages)
    return turns + "Assistant:"


CHAT_STOP = "\n\nUser:"


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    for s in stops:
        check_text(s, "stop")
    return stops


def check_text(text: str, param: str) -> None:
    """A 400 naming ``param`` unless ``text`` is text the tokenizer can take: JSON's ``\\ud800``
    escapes give strings with lone surrogates, which are not Unicode characters."""
    why = utf8_problem(text)
    if why:
        raise ApiError(400, f"{param} is {why}", param=param)


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool, int]:
    """(the text up to the first stop string, whether one was found, how many characters at the
    end must be held back because a stop string may start there)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True, 0
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text, False, hold


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if e.get("type") == "extra_forbidden":
        return f"unknown field: {'.'.join(loc)}", ".".join(loc) or None
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), where or None


# ---------------------------------------------------------------------------------------------- one generation
class Stream:
    """The events of one request on the event loop, turned into text pieces."""

    def __init__(self, tok, stops: list[str]) -> None:
        self.tok, self.stops = tok, stops
        self.ids: list[int] = []
        self.depths: list[int] = []
        self.sent = ""  # text handed out so far
        self.pending: list[int] = []  # depths of tokens whose text is not out yet
        self.stopped = False

    def push(self, evs: list[Token]) -> tuple[str, list[int]]:
        """Add tokens; returns (new text that can be sent, depths of the tokens it completes)."""
        for ev in evs:
            self.ids.append(ev.token)
            self.depths.append(ev.depth)
            self.pending.append(ev.depth)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return "", []
        text, self.stopped, hold = split_at_stop(text, self.stops)
        ready = text[: len(text) - hold]
        if len(ready) < len(self.sent):
            return "", []
        new, self.sent = ready[len(self.sent) :], ready
        if not new and not self.stopped:
            return "", []
        depths, self.pending = self.pending, []
        return new, depths

    def flush(self) -> tuple[str, list[int]]:
        """At the end: whatever was held back (a stop string's prefix that did not complete)."""
        text = self.tok.decode(self.ids) if not self.stopped else self.sent
        text, _, _ = split_at_stop(text, self.stops)
        new = text[len(self.sent) :] if len(text) >= len(self.sent) else ""
        self.sent += new
        depths, self.pending = self.pending, []
        return new, depths


def usage(end: Finished, n_completion: int) -> dict:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": n_completion,
        "total_tokens": end.prompt_tokens + n_completion,
        "flops": end.flops,
        "completion_flops": end.flops - end.prompt_flops,
    }


def finish_reason(end: Finished, stream: Stream) -> str:
    return "stop" if stream.stopped or end.reason == "stop" else "length"


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

    def max_tokens(self, body: _Body, n_prompt: int, chat: bool) -> int:
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

    async def serve(self, request: Request, body: _Body, prompt: str, stops: list[str], chat: bool):
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


class _TooLarge(Exception):
    pass


async def _read_body(receive, cap: int, timeout: float) -> bytes | None:
    """The request's body, read up to ``cap`` bytes within ``timeout`` seconds: _TooLarge past the
    cap (nothing after it is read: the connection is closed), TimeoutError past the time, None if
    the client went away. Chunked bodies (no Content-Length) are counted the same way."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    chunks, size = [], 0
    while True:
        msg = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))  # TimeoutError past the end
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


class _AuthAndCount:
    """Pure ASGI middleware: the API key check, the bounded body read, the request count by path
    and status, and the last resort for unexpected exceptions (a 500 in OpenAI's shape and one line
    on stderr, never a traceback). (Not Starlette's BaseHTTPMiddleware, which passes every streamed
    chunk through an extra stream.)"""

    def __init__(self, app, api: Api) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        key = self.api.s.api_key
        if key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if auth != f"Bearer {key}".encode():
                self.api.count(path, 401)
                body = error_body("missing or wrong API key (Authorization: Bearer KEY)", "invalid_request_error",
                                  code="invalid_api_key")  # fmt: skip
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        status = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            replay = await self.bounded_body(scope, receive, send_counted)
            if replay is not None:
                await self.app(scope, replay, send_counted)
            elif not status:  # the client went away before its body arrived (nginx's 499)
                status.append(499)
        except Exception as e:  # a bug: this request fails in OpenAI's shape, the server goes on
            print(f"error: {scope.get('method', '')} {path} failed: {_one_line(e)}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # the client may be gone too
                if not status:
                    body = error_body("the server failed on this request (an internal error; it is logged)",
                                      "server_error", code="internal_error")  # fmt: skip
                    await JSONResponse(body, status_code=500)(scope, receive, send_counted)
                else:  # the response started: end it
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.api.count(path, status[0] if status else 500)

    async def bounded_body(self, scope, receive, send):
        """Read the body within the limits: a ``receive`` that gives it to the app (then passes the
        server's messages on: the disconnect), or None once the request was refused (413, 408) or
        its client went away."""
        s = self.api.s

        async def refuse(code: int, message: str, err: str) -> None:
            body = error_body(message, "invalid_request_error", code=err)
            # Connection: close, so that the rest of the body is never read
            await JSONResponse(body, status_code=code, headers={"Connection": "close"})(scope, receive, send)

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > s.max_body_bytes:
            return await refuse(413, f"the request body is {int(declared)} bytes; this server takes at most "
                                     f"{s.max_body_bytes} (--max-body-bytes)", "request_too_large")  # fmt: skip
        try:
            body = await _read_body(receive, s.max_body_bytes, s.request_timeout)
        except _TooLarge:
            return await refuse(413, f"the request body is larger than {s.max_body_bytes} bytes, the most this "
                                     f"server takes (--max-body-bytes)", "request_too_large")  # fmt: skip
        except asyncio.TimeoutError:
            return await refuse(408, f"the request body did not arrive within {s.request_timeout:g} seconds "
                                     f"(--request-timeout)", "request_timeout")  # fmt: skip
        if body is None:  # the client went away before its body arrived
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _guard(app: FastAPI, api: Api) -> None:
    """The API key check, request counting, and every error in OpenAI's shape."""
    app.add_middleware(_AuthAndCount, api=api)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        body = error_body(exc.message, exc.kind, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


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

    _guard(app, api)

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


def _plain_answer(transport, status: int, reason: str, message: str, code: str) -> None:
    """An error in OpenAI's shape written straight to a connection, which is then closed."""
    body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()  # fmt: skip
    transport.write(head + body)
    transport.close()


class _BoundedHead:
    """Mixed into uvicorn's HTTP/1.1 protocol (httptools) by :func:`bounded_protocol`: the request's
    head bounded where it is read."""

    timeout: float
    max_head: int
    in_head, head_bytes, head_timer, refused = True, 0, None, False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.timeout, self.head_too_slow)

    def disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_slow(self) -> None:
        self.head_timer = None
        if self.in_head and not self.transport.is_closing():
            self.refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.timeout:g} "
                                                f"seconds (--request-timeout)", "request_timeout")  # fmt: skip

    def refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self.refused = True
        _plain_answer(self.transport, status, reason, message, code)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.in_head and self.head_bytes + len(data) > self.max_head:  # feed up to the bound, then look
            room = self.max_head - self.head_bytes
            self.head_bytes = self.max_head
            super().data_received(data[:room])
            if self.in_head and not self.refused and not self.transport.is_closing():
                self.refuse(431, "Request Header Fields Too Large", f"the request's line and headers are larger "
                            f"than {self.max_head} bytes", "headers_too_large")  # fmt: skip
                return
            data = data[room:]
        elif self.in_head:
            self.head_bytes += len(data)
        if data and not self.refused:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.arm()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0  # what follows is the next request's head


def bounded_protocol(timeout: float, max_head: int = MAX_HEAD_BYTES) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools), with the request's head bounded where it is read:
    at most ``max_head`` bytes of request line and headers (431 beyond; httptools itself gathers a
    header of any length), received within ``timeout`` seconds of the connection or of the
    request's first byte (408 then; uvicorn waits for a slow head forever). Both answer in OpenAI's
    shape and close the connection. The body's bounds are the app's (:class:`_AuthAndCount`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("BoundedHttpToolsProtocol", (_BoundedHead, HttpToolsProtocol), {"timeout": timeout,
                                                                              "max_head": max_head})  # fmt: skip


def api_key_from_env(given: str | None) -> str | None:
    return given if given is not None else (os.environ.get(API_KEY_ENV) or None)


def run(engine: Engine, tok, settings: ServerSettings, sock, *, shutdown_timeout: float = 30.0) -> int:
    """Serve on the listening socket ``sock`` until SIGTERM or SIGINT, then finish the streams in
    flight (for up to ``shutdown_timeout`` seconds; later ones are cut), stop the scheduler and
    return 0."""
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
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that does nothing
    # turns that into a normal return (exit status 0 after a clean shutdown)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)
    return 0
