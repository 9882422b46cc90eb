"""The OpenAI dialect the server speaks: request bodies as validated models, chat rendering, stop
strings, the incremental text of one generation, usage and error shapes. Pure: no HTTP, no model."""

from __future__ import annotations

from typing import Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from ponderlm.errors import utf8_problem
from ponderlm.serving.scheduler import Finished, Token

CHAT_ROLES = ("system", "user", "assistant")


MAX_STOP_CHARS = 256  # the longest stop string (each token checks every prefix of every stop string)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class BodyBase(BaseModel):
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


class CompletionBody(BodyBase):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(BodyBase):
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


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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
