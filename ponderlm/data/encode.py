"""Tokenizing batches of documents in worker processes, with the results back in order.

The reader (the main process) cuts the document stream into batches; :class:`Encoder` tokenizes
them in ``workers`` processes and yields the results in submission order, so the shards written
from them are the same bytes for any number of workers. At most ``2 * workers + 1`` batches are
in flight: memory does not grow with the corpus, and a slow writer slows the reader down.

Workers ignore SIGINT (the main process decides what a Ctrl-C means and stops them) and tokenize
without the tokenizer's own thread pool (one core each). With one worker, batches are tokenized in
the main process, in a helper thread so that Ctrl-C still ends the command at once.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as ResultNotReady
from typing import TypeVar

import numpy as np

from ponderlm.data.tokenizer import Tokenizer, interruptible

_B = TypeVar("_B")
_WORKER: dict = {}  # in a worker process: the tokenizer and the id dtype
WORKER_ENV = "PONDERLM_TOKENIZER_WORKER"


def _exit_with_parent(parent: int) -> None:
    """A worker whose build was killed (SIGKILL, the OOM killer) exits instead of waiting forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(parent: int, tokenizer_json: str, eot_id: int, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER.update(tk=HFTokenizer.from_str(tokenizer_json), eot=eot_id, dtype=np.dtype(dtype))


def encode_texts(
    tk, texts: list[str], eot_id: int, dtype, closes: list[bool] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts``, each closed by end-of-text (only those whose ``closes`` is true: the
    others are pieces of a long document that the next text continues), concatenated; and the
    length of each."""
    seqs = [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]  # one list per text
    for i, seq in enumerate(seqs):
        if closes is None or closes[i]:
            seq.append(eot_id)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str], closes: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(_WORKER["tk"], texts, _WORKER["eot"], _WORKER["dtype"], closes)


class Encoder:
    """``map(batches)``: for each ``(texts, closes, payload)`` in order, ``(flat ids, lengths, payload)``
    (``closes[i]``: text i ends its document, and gets the end-of-text token)."""

    def __init__(self, tok: Tokenizer, dtype, workers: int) -> None:
        self.tok, self.dtype, self.workers = tok, np.dtype(dtype), workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            os.environ[WORKER_ENV] = "1"  # inherited by the spawned workers (read by ponderlm/__init__.py)
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # no fork after the tokenizer's threads ran
                initializer=_init_worker,
                initargs=(os.getpid(), self.tok.tk.to_str(), self.tok.eot_id, self.dtype.name),
            )
        elif os.environ.get("TOKENIZERS_PARALLELISM") is None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --workers 1 means one core
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            # an interrupted build does not wait for the batches in flight
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None
            os.environ.pop(WORKER_ENV, None)

    def map(self, batches: Iterable[tuple[list[str], list[bool], _B]]) -> Iterator[tuple[np.ndarray, np.ndarray, _B]]:
        if self._pool is None:
            for texts, closes, payload in batches:
                flat, lengths = interruptible(
                    lambda t=texts, c=closes: encode_texts(self.tok.tk, t, self.tok.eot_id, self.dtype, c)
                )
                yield flat, lengths, payload
            return
        window: deque[tuple[Future, _B]] = deque()
        limit = 2 * self.workers + 1
        for texts, closes, payload in batches:
            window.append((self._pool.submit(_encode_in_worker, texts, closes), payload))
            if len(window) >= limit:
                yield self._result(window.popleft())
        while window:
            yield self._result(window.popleft())

    @staticmethod
    def _result(item: tuple[Future, _B]) -> tuple[np.ndarray, np.ndarray, _B]:
        future, payload = item
        while True:  # short waits: a Ctrl-C is seen at once
            try:
                flat, lengths = future.result(timeout=0.2)
                return flat, lengths, payload
            except ResultNotReady:
                continue
