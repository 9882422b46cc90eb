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

Every field of OpenAI's and vLLM's completions and chat request models is accepted at a value that does not
change the answer and refused (400 naming it) at any other (:mod:`ponderlm.serving.protocol`); vLLM's
tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``, which lm-eval's remote tokenizer
uses) tokenize in the same worker threads, within the same bound.

A completions ``prompt`` may be a list (strings, or token ids): one engine request and one choice per
prompt. ``logprobs`` and ``echo`` are computed in the engine (the prompt's logprobs by
:func:`~ponderlm.serving.scoring.score_prompt`, ``ponderlm eval``'s scoring; a generated token's from the
logits it was chosen from); this process only names the tokens and builds OpenAI's ``logprobs`` object
(:class:`~ponderlm.serving.responses.Logprobs`; chat's ``logprobs``/``top_logprobs``:
:class:`~ponderlm.serving.responses.ChatLogprobs`, the same numbers in the chat shape; vLLM's
``prompt_logprobs``, from the same prompt scoring: :class:`~ponderlm.serving.responses.PromptLogprobs`).

Extensions to OpenAI's shapes: every choice (and every streamed chunk) carries ``ponder_depths``,
the realised ponder steps of each generated token it covers, and ``usage`` adds ``flops`` (the
request's inference FLOPs at its realised depths) and ``completion_flops`` (those beyond the prompt).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import Callable
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
from ponderlm.serving.page import add_page
from ponderlm.serving.protocol import (
    CHAT_STOP,
    ApiError,
    BodyBase,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    TokenizeBody,
    chat_prompt,
    check_text,
    stop_strings,
    unsupported,
)
from ponderlm.serving.responses import (
    ChatLogprobs,
    Choice,
    Logprobs,
    Out,
    PromptLogprobs,
    Stream,
    put_event,
    sse,
    whole_response,
)
from ponderlm.serving.scheduler import QueueFull

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
    model_config: object = None  # the model's ModelConfig: the page's FLOPs by depth (ponderlm.serving.page)

    @property
    def max_prompt_chars(self) -> int:
        """A prompt of more characters than this cannot fit in the context: refused before tokenizing."""
        return self.context * self.token_chars


def byte_units() -> dict[int, str]:
    """The byte-level pre-tokenizer's alphabet: each byte's character (GPT-2's ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]  # fmt: skip
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], n = chr(256 + n), n + 1
    return out


def longest_token(tok) -> int:
    """The most characters of text one token of ``tok`` can stand for: the longest entry of its
    vocabulary (a byte-level entry has one character per byte, and a byte is at most one character
    of text; added tokens match their own text). So a text of more than ``n * longest_token``
    characters encodes to more than n tokens, whatever it is (unless the tokenizer's normaliser
    merges or drops characters, as NFC composes combining marks: such rare texts are refused all
    the same)."""
    return max(1, max((len(t) for t in tok.tk.get_vocab(with_added_tokens=True)), default=1))


# ---------------------------------------------------------------------------------------------- the app
class Api:
    """The endpoints' work, on the event loop: validate, queue, turn the scheduler's events into responses."""

    KNOWN = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/tokenizer_info")  # fmt: skip

    def __init__(self, engine: Engine, tok, settings: ServerSettings) -> None:
        self.engine, self.tok, self.s = engine, tok, settings
        self.counters: dict[tuple[str, int], int] = {}  # (path, status) -> requests
        # tokenizing off the event loop: two at a time (more would take cores from the engine)
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ponderlm-tokenize")
        self._from_unicode: dict[str, int] | None = None  # token_bytes: byte-level characters -> bytes

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
        chat; 0: the prompt only, with echo), refused with a 400 naming the context when it does not fit."""
        ctx = self.s.context
        room = ctx - n_prompt
        n = body.max_tokens
        if n is None:
            n = max(1, min(self.s.default_max_tokens, room) if not chat else room)
        if n > room:  # (n is 0 only with echo: then the prompt alone must fit)
            param = "max_tokens" if room >= 1 else ("messages" if chat else "prompt")
            raise ApiError(400, f"this model's context is {ctx} tokens: the prompt has {n_prompt} and max_tokens "
                                f"asks for {n}; shorten the prompt or lower max_tokens", param=param,
                           code="context_length_exceeded")  # fmt: skip
        return n

    async def tokenize(self, prompt: str, special: bool = False) -> list[int]:
        """The prompt's ids, computed in a worker thread: ``encode_batch`` releases the interpreter
        lock while it works (``encode`` holds it), so the event loop goes on streaming. ``special``:
        with what the tokenizer's post-processor adds (ponderlm's tokenizers add nothing)."""
        loop = asyncio.get_running_loop()
        if special:
            encode = functools.partial(self.tok.tk.encode_batch, add_special_tokens=True)
            return (await loop.run_in_executor(self.tokenizer_pool, encode, [prompt]))[0].ids
        return (await loop.run_in_executor(self.tokenizer_pool, self.tok.encode_batch, [prompt]))[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.s.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.s.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def check_chars(self, prompt: str, field: str) -> None:
        """A prompt longer than any that fits the context, refused before any work proportional to it."""
        limit = self.s.max_prompt_chars
        if len(prompt) > limit:
            raise ApiError(400, f"this model's context is {self.s.context} tokens, which no prompt of more than "
                                f"{limit} characters fits; the prompt has {len(prompt)}", param=field,
                           code="context_length_exceeded")  # fmt: skip

    async def tokenize_request(self, body: TokenizeBody) -> dict:
        """vLLM's ``/tokenize``: the ids a prompt (or chat messages, rendered) becomes, as the completions
        endpoints tokenize it (in the worker threads, within the same character bound)."""
        self.check_model(body.model)
        unsupported(body, body.NEUTRAL)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        if body.prompt is not None:
            check_text(body.prompt, "prompt")
            text, field = body.prompt, "prompt"
        else:
            text, _ = self.chat_text(body)
            field = "messages"
        self.check_chars(text, field)
        ids = await self.tokenize(text, bool(body.add_special_tokens)) if text else []
        strs = [self.tok.tk.id_to_token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.s.context, "tokens": ids, "token_strs": strs}

    async def detokenize_request(self, body: DetokenizeBody) -> dict:
        """vLLM's ``/detokenize``: the text of token ids (special tokens kept), decoded in a worker thread."""
        self.check_model(body.model)
        vocab = self.tok.vocab_size
        for j, t in enumerate(body.tokens):
            if not 0 <= t < vocab:
                raise ApiError(400, f"tokens.{j}: {t} is not a token id of this tokenizer (0 to {vocab - 1})",
                               param="tokens")  # fmt: skip
        loop = asyncio.get_running_loop()
        return {"prompt": await loop.run_in_executor(self.tokenizer_pool, self.tok.decode, body.tokens)}

    def tokenizer_info(self) -> dict:
        """vLLM's ``/tokenizer_info``, the keys lm-eval's remote tokenizer reads (``eos_token``, ``bos_token``,
        ``pad_token``, ``chat_template``) and a few more."""
        special = self.tok.special_tokens
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.tok.eos_token,
                "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
                "unk_token": special.get("unk_token"), "model_max_length": self.s.context,
                "vocab_size": self.tok.vocab_size, "chat_template": self.tok.chat_template}  # fmt: skip

    def chat_text(self, body) -> tuple[str, list[str]]:
        """A chat request's prompt and the stop strings it implies: none for the model's own template
        (the reply ends at its end-of-turn token, the engine's EOS), :data:`CHAT_STOP` for the plain one."""
        text = chat_prompt(self.tok, body.messages, body.add_generation_prompt, body.continue_final_message)
        return text, [] if self.tok.chat_template is not None else [CHAT_STOP]

    def check_ids(self, ids: list[int], where: str) -> None:
        vocab = self.tok.vocab_size
        for j, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ApiError(400, f"{where}.{j}: {t} is not a token id of this tokenizer (0 to {vocab - 1})",
                               param="prompt")  # fmt: skip

    async def completion_prompts(self, body: CompletionBody, prompts: list) -> list[tuple[list[int], str]]:
        """Each prompt's (ids, text): strings tokenized (after the character bound), token ids checked
        against the vocabulary and decoded (the text ``echo`` returns)."""
        cap = self.engine.settings.max_batch + self.engine.settings.max_queue
        if len(prompts) > cap:
            raise ApiError(400, f"prompt: a list of {len(prompts)} prompts; this server takes at most {cap} in one "
                                "request (--max-batch + --max-queue)", param="prompt")  # fmt: skip
        single = len(prompts) == 1
        out = []
        loop = asyncio.get_running_loop()
        for i, p in enumerate(prompts):
            where = "prompt" if single else f"prompt.{i}"
            if isinstance(p, str):
                self.check_chars(p, "prompt")
                ids = await self.tokenize(p, bool(body.add_special_tokens)) if p else []
                text = p
            else:
                self.check_ids(p, where)
                if len(p) > self.s.context:
                    self.max_tokens(body, len(p), chat=False)  # the context error
                ids = p
                text = await loop.run_in_executor(self.tokenizer_pool, self.tok.decode, p) if body.echo else ""
            if not ids:
                raise ApiError(400, f"{where}: the prompt is empty", param="prompt")
            out.append((ids, text))
        return out

    def token_names(self, ids: list[int]) -> dict[int, str]:
        """Each token's own text (a byte-level token that is part of a character: U+FFFD), as vLLM names them."""
        return dict(zip(ids, self.tok.tk.decode_batch([[i] for i in ids], skip_special_tokens=False), strict=True))

    def token_bytes(self, ids: list[int]) -> dict[int, list[int]]:
        """Each token's own bytes (chat logprobs' ``bytes``): a byte-level vocabulary entry mapped back to
        the bytes it stands for (a part of a character is that part); any other token (an added token, or
        a vocabulary that is not byte-level), the UTF-8 of its text."""
        if self._from_unicode is None:
            from tokenizers import decoders

            byte_level = isinstance(self.tok.tk.decoder, decoders.ByteLevel)
            self._from_unicode = {c: b for b, c in byte_units().items()} if byte_level else {}
        added = set(self.tok.tk.get_added_tokens_decoder())
        back, out = self._from_unicode, {}
        texts = self.token_names([i for i in ids if i in added or not back])
        for i in ids:
            entry = self.tok.tk.id_to_token(i) if back and i not in added else None
            if entry is not None and all(c in back for c in entry):
                out[i] = [back[c] for c in entry]
            else:
                out[i] = list((texts.get(i) or self.tok.tk.decode([i], skip_special_tokens=False)).encode())
        return out

    async def serve(self, request: Request, body: BodyBase, prompts: list[tuple[list[int], str]], stops: list[str],
                    chat: bool):  # fmt: skip
        """Submit one engine request per prompt (one choice each) and answer: a whole response or a stream."""
        field = "messages" if chat else "prompt"
        for ids, _ in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty", param=field)
        lengths = [self.max_tokens(body, len(ids), chat) for ids, _ in prompts]
        echo = bool(getattr(body, "echo", False))
        logprobs = body.logprobs_k() if chat else body.logprobs
        prompt_k = body.prompt_logprobs  # vLLM's: the engine scores the prompt with the larger top-k of the two
        engine_k = logprobs if prompt_k is None else max(prompt_k, logprobs or 0)
        events: asyncio.Queue = asyncio.Queue()  # (choice index, event), filled on the event loop by _dispatch
        cap = self.engine.settings.max_batch + self.engine.settings.max_queue
        if len(self.engine.reqs) + len(prompts) > cap:
            raise ApiError(429, f"the server is at capacity ({self.engine.settings.max_queue} requests are waiting); "
                                "retry later", kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})  # fmt: skip
        choices = []
        for i, ((ids, text), n) in enumerate(zip(prompts, lengths, strict=True)):
            req = batching.Request(ids, n, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                   ignore_eos=body.ignore_eos, logprobs=engine_k,
                                   score_prompt=(echo and logprobs is not None) or prompt_k is not None,
                                   on_event=functools.partial(put_event, events, i))  # fmt: skip
            stream = Stream(self.tok, stops, bool(body.skip_special_tokens))
            lp = None if logprobs is None else ChatLogprobs(self.token_names, self.token_bytes, logprobs) if chat \
                else Logprobs(self.token_names, logprobs)  # fmt: skip
            plp = None if prompt_k is None else PromptLogprobs(self.token_names, prompt_k)
            choices.append(Choice(i, req, stream, ids, text if echo else None, lp, plp=plp))
        try:
            for c in choices:
                self.engine.submit(c.req)
        except QueueFull as e:
            for c in choices:
                c.req.cancel()
            raise ApiError(429, f"the server is at capacity ({e}); retry later", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineError as e:
            for c in choices:
                c.req.cancel()
            raise ApiError(503, f"the server cannot generate: {e}", kind="server_error",
                           code="engine_down") from None  # fmt: skip
        out = Out(rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                   model=self.s.model_id, chat=chat)  # fmt: skip
        if body.stream:
            include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
            gen = sse(choices, events, out, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await whole_response(request, choices, events, out)


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

    add_page(app, settings, engine)  # GET /: the page that shows the router at work

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, api.counters), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        body.check()
        prompts = body.prompts()
        stops = stop_strings(body.stop)
        api.check_model(body.model)
        return await api.serve(request, body, await api.completion_prompts(body, prompts), stops, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        body.check()
        prompt, implied = api.chat_text(body)
        api.check_model(body.model)
        stops = [*stop_strings(body.stop), *implied]
        api.check_chars(prompt, "messages")  # bounded before any work proportional to it
        ids = await api.tokenize(prompt, bool(body.add_special_tokens)) if prompt else []
        return await api.serve(request, body, [(ids, "")], stops, chat=True)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        return await api.tokenize_request(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        return await api.detokenize_request(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return api.tokenizer_info()

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
