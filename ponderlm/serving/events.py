"""What goes into the scheduler and what comes out: a :class:`Request`, and its events (a
generated :class:`Token`, the prompt's :class:`PromptScores`, the last :class:`Finished`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Token:
    """One generated token (never EOS) and the ponder steps spent to produce it."""

    token: int
    depth: int
    logprob: float | None = None  # log p(token) under the raw model distribution (requests asking for logprobs)
    top: list[tuple[int, float]] | None = None  # the top-k (id, logprob) of that distribution, most likely first


@dataclass
class PromptScores:
    """A request's first event when it asked for its prompt's log-probabilities (``echo`` with
    ``logprobs``): for prompt tokens 1..T-1, log p(token | the tokens before it) and the top-k of
    each position, from :func:`score_prompt` (the scoring computation of ``ponderlm eval``)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    ranks: list[int] = field(default_factory=list)  # each token's rank in its distribution (1: the likeliest)


@dataclass
class Finished:
    """A request's last event."""

    reason: str  # "stop" (EOS), "length" (max_tokens), "cancelled" or "error"
    prompt_tokens: int
    depths: list[int]  # depth of every generated token (EOS included when it ended the row)
    flops: float = 0.0  # inference FLOPs of the request: the prompt and every token fed back
    prompt_flops: float = 0.0
    eos: Token | None = None  # the EOS that ended the row, with its logprobs (requests asking for logprobs)


Event = Token | PromptScores | Finished


@dataclass
class Request:
    """One completion: token ids in, events out through ``on_event`` (called on the scheduler thread)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens even past EOS (fixed lengths for load tests)
    logprobs: int | None = None  # each generated token's logprob and its distribution's top-k (None: none)
    score_prompt: bool = False  # first, the prompt's logprobs (top-k: ``logprobs``); max_tokens 0: only that
    score_flops: float = 0.0  # set by the scheduler: the FLOPs of scoring the prompt
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)  # set from any thread
    id: int = 0  # the engine process's name for it (ponderlm.serving.engine)
    on_cancel: Callable[[str], None] | None = None  # called once by cancel() with its reason (the engine forwards it)
    cancel_reason: str = "cancelled"  # the Finished reason of a cancelled row: "stop" when a stop string ended it

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating; the scheduler drops the row (and frees its cache) at its next step,
        finished with ``reason`` ("stop": the caller found a stop string; "cancelled" otherwise)."""
        if self.cancelled.is_set():
            return
        self.cancel_reason = reason
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(reason)
