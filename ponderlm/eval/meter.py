"""Progress of a long scoring step: work done out of the total, the rate and the ETA, as training
shows its steps.

A scoring loop (:func:`ponderlm.eval.perplexity.perplexity`, :func:`ponderlm.eval.zeroshot.loglikelihoods`,
:func:`ponderlm.eval.analyze.collect`) takes ``progress``, a callable it calls after every batch
with (done, total); :class:`Meter` is that callable. While its block runs it logs, every ``every``
seconds, ``<what>: 16/64 windows (25%), 0.52 windows/s, ETA 1:32 (0:31 so far)``: the rate of
:class:`ponderlm.progress.Rate` over recent batches, and the ETA the work left at that same rate.
A block shorter than ``every`` prints nothing. The lines come from a timer, not from the batches,
so a step whose batches are slow still says where it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ponderlm.progress import Rate, clock


def _per_s(rate: float | None) -> str:
    if rate is None:
        return "?"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class Meter:
    """``update(done, total)`` after each batch; used as a context manager around the loop, it logs
    :meth:`line` every ``every`` seconds (``clock``: seconds, any clock)."""

    def __init__(
        self,
        what: str,
        unit: str,
        log: Callable[[str], None] = print,
        *,
        total: int | None = None,
        every: float = 10.0,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.unit, self.log, self.every, self.clock = what, unit, log, every, clock
        self.total = total
        self.done = 0
        self.t0 = clock()
        self.rate = Rate(window)
        self.rate.add(self.t0, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` units of ``total`` (when given; else the total the meter was made with)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            self.rate.add(self.clock(), done)

    __call__ = update

    def line(self) -> str:
        """``<what>: done/total unit (pct), rate unit/s, ETA m:ss (m:ss so far)``."""
        with self._lock:
            done, total, rate = self.done, self.total, self.rate.per_s
            eta = self.rate.eta_s(max(total - done, 0)) if total is not None else None
        elapsed = clock(self.clock() - self.t0)
        if total is None:
            return f"{self.what}: {done:,} {self.unit}, {_per_s(rate)} {self.unit}/s ({elapsed} so far)"
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        return (
            f"{self.what}: {done:,}/{total:,} {self.unit}{pct}, {_per_s(rate)} {self.unit}/s, "
            f"ETA {clock(eta)} ({elapsed} so far)"
        )

    def __enter__(self) -> Meter:
        def beat() -> None:
            while not self._stop.wait(self.every):
                self.log(self.line())

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
