"""One request's answer as it comes back from the engine: each choice's text (decoded incrementally,
stop strings found), depths and log-probabilities, sent as server-sent events or gathered into one
response in OpenAI's completions or chat shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import PlainTextResponse

from ponderlm.serving import scheduler as batching
from ponderlm.serving.protocol import ApiError, error_body, split_at_stop
from ponderlm.serving.scheduler import Finished, Token
from ponderlm.serving.scoring import PromptScores


def put_event(events: asyncio.Queue, i: int, ev) -> None:
    events.put_nowait((i, ev))


@dataclass
class Choice:
    """One prompt of a request: its engine request, its text so far, its logprobs."""

    index: int
    req: batching.Request
    stream: Stream
    ids: list[int]
    echo: str | None  # the prompt's text, returned before the completion (echo), or None
    lp: Logprobs | None  # the logprobs object being built (logprobs asked for), or None
    scores: PromptScores | None = None
    end: Finished | None = None
    started: bool = False  # a stream sent its echo chunk
    failed: bool = False  # a stream's row was cut short
    plp: PromptLogprobs | None = None  # vLLM's prompt_logprobs asked for (never streamed)

    def push(self, toks: list[Token]) -> tuple[str, list[Token]]:
        """Tokens in; (the text they complete, the tokens it covers). With logprobs, one token at a
        time, up to the one that completes a stop string (the logprobs cover exactly the text's tokens)."""
        st = self.stream
        if self.lp is None:
            st.push(toks)
            return "", []  # (the streaming path reads st's state itself)
        text, handed = "", []
        for t in toks:
            if st.stopped:
                break
            piece, _ = st.push([t])
            text += piece
            handed += st.handed if (piece or st.stopped) else []
        return text, handed

    def prompt_block(self) -> dict | None:
        if self.lp is None or self.echo is None:
            return None
        return self.lp.block(Logprobs.prompt_entries(self.ids, self.scores))

    def take(self, toks: list[Token], scores: PromptScores | None, end: Finished | None) -> None:
        """A whole response's events: tokens pushed (a stop string cancels the row), the end kept."""
        if scores is not None:
            self.scores = scores
        if toks:
            self.push(toks)
            if self.stream.stopped:
                self.req.cancel("stop")
        if end is not None:
            self.end = end

    def lines(self, out: Out, toks: list[Token], scores: PromptScores | None, end: Finished | None) -> list[str]:
        """A stream's chunks for these events: the echoed prompt first, the text of the tokens, the end
        (a row cut short: an error line, and :attr:`failed`)."""
        lines, i, st = [], self.index, self.stream
        if scores is not None:
            self.scores = scores
        if self.echo is not None and not self.started and (scores is not None or self.lp is None or end or toks):
            self.started = True
            lines.append(sse_line(out.chunk(self.echo, [], None, index=i, logprobs=self.prompt_block())))
        if toks:
            if self.lp is None:
                text, depths = st.push(toks)
                lps = None
            else:
                text, handed = self.push(toks)
                depths = [t.depth for t in handed]
                lps = self.end_entries(handed) if handed else None
            if text or depths:
                lines.append(sse_line(out.chunk(text, depths, None, index=i, logprobs=lps)))
            if st.stopped:
                self.req.cancel("stop")
        if end is None:
            return lines
        self.end = end
        if end.reason in ("cancelled", "error") and not st.stopped:
            self.failed = True
            return [*lines, sse_line(error_body("the generation was cut short on the server", "server_error"))]
        text, depths = st.flush()
        lps = self.end_entries(st.handed) if self.lp is not None else None
        return [*lines, sse_line(out.chunk(text, depths, finish_reason(end, st), index=i, logprobs=lps))]

    def whole(self, chat: bool) -> dict:
        """The choice of a whole response, once it ended."""
        st = self.stream
        st.flush()
        lps = None
        if self.lp is not None:
            pre = self.prompt_block()  # (first: the text offsets start with the prompt's)
            gen = self.end_entries(st.toks)
            lps = merge_logprobs(pre, gen) if pre is not None else gen
        choice = {"index": self.index, "finish_reason": finish_reason(self.end, st), "logprobs": lps,
                  "ponder_depths": st.depths}  # fmt: skip
        if chat:
            choice["message"] = {"role": "assistant", "content": st.sent}
        else:
            choice["text"] = (self.echo or "") + st.sent
            if self.plp is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs()
        return choice

    def prompt_logprobs(self) -> list | None:
        return None if self.plp is None else self.plp.block(self.ids, self.scores)

    def end_entries(self, handed: list[Token]) -> dict | None:
        """The logprobs of the tokens ``handed`` and, at the end, the EOS that ended the row."""
        if self.lp is None:
            return None
        toks = handed + ([self.end.eos] if self.end is not None and self.end.eos is not None else [])
        return self.lp.block(Logprobs.token_entries(toks))


@dataclass
class Out:
    """What every response object of one request repeats."""

    rid: str
    created: int
    model: str
    chat: bool

    def obj(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str, depths: list[int], reason: str | None, role: bool = False, index: int = 0,
              logprobs: dict | None = None) -> dict:  # fmt: skip
        choice = {"index": index, "finish_reason": reason, "logprobs": logprobs, "ponder_depths": depths}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        else:
            choice["text"] = text
        return self.obj([choice], chunk=True)


def sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def drain(events: asyncio.Queue, first) -> dict[int, tuple[list[Token], PromptScores | None, Finished | None]]:
    """``first`` and every event already waiting, by choice: its tokens, its prompt's scores, its end if it came."""
    got: dict[int, tuple[list, PromptScores | None, Finished | None]] = {}
    item = first
    while True:
        i, ev = item
        toks, scores, end = got.get(i, ([], None, None))
        if isinstance(ev, Finished):
            end = ev
        elif isinstance(ev, PromptScores):
            scores = ev
        else:
            toks.append(ev)
        got[i] = (toks, scores, end)
        if events.empty():
            return got
        item = events.get_nowait()


async def sse(choices: list[Choice], events: asyncio.Queue, out: Out, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: per choice, its echoed prompt first (with its logprobs) if asked, then a
    chunk per piece of text (with the depths, and logprobs if asked, of the tokens it completes),
    its finish reason; then usage if asked, ``[DONE]``. A chunk carries every token that arrived
    since the last one: one token while the client keeps up, several when the event loop falls
    behind (fewer, larger writes exactly when writes are the bottleneck). However it ends, the
    rows are released."""
    try:
        if out.chat:
            yield sse_line(out.chunk("", [], None, role=True))
        left = len(choices)
        while left and not any(c.failed for c in choices):
            for i, evs in drain(events, await events.get()).items():
                c = choices[i]
                for line in c.lines(out, *evs):
                    yield line
                left -= evs[2] is not None
                if c.failed:
                    break
        if include_usage and not any(c.failed for c in choices):
            n = sum(len(c.stream.ids) for c in choices)
            yield sse_line({**out.obj([], chunk=True), "usage": usage([c.end for c in choices], n)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the server is stopping): the rows go at the next step
        for c in choices:
            c.req.cancel()


async def until_disconnect(receive, choices: list[Choice]) -> None:
    """Wait for the client to go away (the server's ``http.disconnect``), then cancel the rows."""
    while (await receive())["type"] != "http.disconnect":
        pass
    for c in choices:
        c.req.cancel()


async def whole_response(request: Request, choices: list[Choice], events: asyncio.Queue, out: Out):
    """The whole completion as one response. A task watches the connection meanwhile: a client
    that disconnects cancels its rows at once (the next step drops them), however busy they are."""
    watch = asyncio.create_task(until_disconnect(request.receive, choices))
    try:
        left = len(choices)
        while left:
            for i, (toks, scores, end) in drain(events, await events.get()).items():
                choices[i].take(toks, scores, end)
                left -= end is not None
    finally:
        watch.cancel()
        for c in choices:
            c.req.cancel()
    stopped = all(c.stream.stopped for c in choices)
    if watch.done() and not watch.cancelled() and watch.exception() is None and not stopped:  # client gone
        return PlainTextResponse("", status_code=499)
    if any(c.end.reason in ("cancelled", "error") and not c.stream.stopped for c in choices):
        raise ApiError(500, "the generation was cut short on the server", kind="server_error")
    n = sum(len(c.stream.ids) for c in choices)
    got = {**out.obj([c.whole(out.chat) for c in choices], chunk=False), "usage": usage([c.end for c in choices], n)}
    if out.chat and choices[0].plp is not None:  # vLLM's chat response carries them beside the choices
        got["prompt_logprobs"] = choices[0].prompt_logprobs()
    return got


MIN_LOGPROB = -9999.0  # a logprob below this (-inf) is sent as this, as vLLM does (JSON has no infinity)


class Stream:
    """The events of one request on the event loop, turned into text pieces."""

    def __init__(self, tok, stops: list[str], skip_special: bool = False) -> None:
        self.tok, self.stops = tok, stops
        # vLLM's skip_special_tokens: special tokens (EOT under ignore_eos) left out of the text
        self.decode = (lambda ids: tok.tk.decode(ids, skip_special_tokens=True)) if skip_special else tok.decode
        self.ids: list[int] = []
        self.depths: list[int] = []
        self.sent = ""  # text handed out so far
        self.pending: list[Token] = []  # tokens whose text is not out yet
        self.handed: list[Token] = []  # the tokens whose text the last push/flush handed out
        self.toks: list[Token] = []  # every token pushed
        self.stopped = False

    def push(self, evs: list[Token]) -> tuple[str, list[int]]:
        """Add tokens; returns (new text that can be sent, depths of the tokens it completes)."""
        for ev in evs:
            self.ids.append(ev.token)
            self.depths.append(ev.depth)
            self.pending.append(ev)
            self.toks.append(ev)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return "", []
        text, self.stopped, hold = split_at_stop(text, self.stops)
        ready = text[: len(text) - hold]
        if len(ready) < len(self.sent):
            return "", []
        new, self.sent = ready[len(self.sent) :], ready
        if not new and not self.stopped:
            return "", []
        self.handed, self.pending = self.pending, []
        return new, [t.depth for t in self.handed]

    def flush(self) -> tuple[str, list[int]]:
        """At the end: whatever was held back (a stop string's prefix that did not complete)."""
        text = self.decode(self.ids) if not self.stopped else self.sent
        text, _, _ = split_at_stop(text, self.stops)
        new = text[len(self.sent) :] if len(text) >= len(self.sent) else ""
        self.sent += new
        self.handed, self.pending = self.pending, []
        return new, [t.depth for t in self.handed]


def usage(ends: list[Finished], n_completion: int) -> dict:
    """The usage of a request: every prompt's and every completion's (one per prompt)."""
    prompt = sum(e.prompt_tokens for e in ends)
    flops = sum(e.flops for e in ends)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": n_completion,
        "total_tokens": prompt + n_completion,
        "flops": flops,
        "completion_flops": flops - sum(e.prompt_flops for e in ends),
    }


class Logprobs:
    """OpenAI's completions ``logprobs`` object of one choice, built piece by piece: ``tokens`` (each
    token's text), ``token_logprobs``, ``top_logprobs`` (the top-k alternatives as {text: logprob},
    plus the token itself when not among them, as vLLM; null where ``token_logprobs`` is) and
    ``text_offset`` (where each token's text starts: the sum of the texts of the tokens before it in
    the choice, the echoed prompt's first)."""

    def __init__(self, names, k: int | None = None) -> None:
        self.names = names  # list of ids -> their texts (one each)
        self.k = k  # the alternatives shown (the engine may give more: prompt_logprobs asked for more)
        self.offset = 0

    def block(self, entries: list[tuple[int, float | None, list[tuple[int, float]] | None]]) -> dict:
        """``entries``: (token, logprob or None, top-k (id, logprob) or None) in order."""
        names = self.names(sorted({t for t, _, _ in entries} | {i for _, _, top in entries for i, _ in top or []}))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            top = (top or [])[: self.k]
            s = names[t]
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            alts: dict[str, float] = {}
            for i, v in top or []:  # tokens of the same text (parts of characters): the likeliest's
                alts.setdefault(names[i], max(v, MIN_LOGPROB))
            alts.setdefault(s, max(lp, MIN_LOGPROB))
            out["token_logprobs"].append(max(lp, MIN_LOGPROB))
            out["top_logprobs"].append(alts)
        return out

    @staticmethod
    def prompt_entries(ids: list[int], scores: PromptScores | None) -> list:
        """The echoed prompt's entries: its first token has no logprob (nothing precedes it)."""
        if scores is None:
            return []
        return [(ids[0], None, None)] + [(t, lp, top) for t, lp, top in zip(ids[1:], scores.logprobs, scores.top,
                                                                           strict=True)]  # fmt: skip

    @staticmethod
    def token_entries(toks: list[Token]) -> list:
        return [(t.token, t.logprob, t.top) for t in toks]


class ChatLogprobs:
    """OpenAI's chat ``logprobs`` object of one choice: ``content``, one entry per token, each its text
    (``token``), ``logprob``, ``bytes`` (the token's own bytes: a part of a character is its bytes, not
    U+FFFD's) and ``top_logprobs``, the top-k alternatives in the same shape, most likely first (exactly
    k, as OpenAI: the token itself is listed only when among them). The values are the completions
    endpoint's (:class:`Logprobs`): the raw distribution each token was chosen from."""

    def __init__(self, names, raw, k: int | None = None) -> None:
        self.names = names  # list of ids -> their texts (one each)
        self.raw = raw  # list of ids -> their bytes (one each)
        self.k = k  # the alternatives shown (the engine may give more: prompt_logprobs asked for more)

    def block(self, entries: list[tuple[int, float | None, list[tuple[int, float]] | None]]) -> dict:
        """``entries``: (token, logprob, top-k (id, logprob)) in order, as :meth:`Logprobs.block` takes them."""
        ids = sorted({t for t, _, _ in entries} | {i for _, _, top in entries for i, _ in top or []})
        names, raw = self.names(ids), self.raw(ids)

        def one(t: int, lp: float) -> dict:
            return {"token": names[t], "logprob": max(lp, MIN_LOGPROB), "bytes": raw[t]}

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in (top or [])[: self.k]]}
                            for t, lp, top in entries]}  # fmt: skip


class PromptLogprobs:
    """vLLM's ``prompt_logprobs`` of one prompt: per prompt token, null for the first (nothing precedes it),
    else ``{token id: {"logprob", "rank", "decoded_token"}}`` for the token itself (its rank in the
    distribution, 1 the likeliest) and the k likeliest (ranks 1..k), from the prompt's scoring
    (:func:`~ponderlm.serving.scoring.score_prompt`, the numbers ``echo`` gives)."""

    def __init__(self, names, k: int) -> None:
        self.names, self.k = names, k

    def block(self, ids: list[int], scores: PromptScores | None) -> list:
        if scores is None:
            return [None] * len(ids)
        tops = [top[: self.k] for top in scores.top]
        names = self.names(sorted(set(ids) | {i for top in tops for i, _ in top}))

        def entry(i: int, lp: float, rank: int) -> dict:
            return {"logprob": max(lp, MIN_LOGPROB), "rank": rank, "decoded_token": names[i]}

        out: list = [None]
        for t, lp, rank, top in zip(ids[1:], scores.logprobs, scores.ranks, tops, strict=True):
            d = {str(t): entry(t, lp, rank)}
            for r, (i, v) in enumerate(top, 1):
                d.setdefault(str(i), entry(i, v, r))
            out.append(d)
        return out


def merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def finish_reason(end: Finished, stream: Stream) -> str:
    return "stop" if stream.stopped or end.reason == "stop" else "length"
