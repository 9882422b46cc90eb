"""Progress that tells the truth: one measured rate, and the ETA derived from that same rate.

:class:`Rate` is the tokens/s a progress line shows, measured over the last ``window`` seconds (so
it follows the machine as it gets busier or quieter), and the ETA is the work left divided by it:
the two numbers on a line can never disagree. :func:`heartbeat` prints a line every ``every``
seconds while a step that shows no progress of its own is running. :class:`Progress` is the line
of a data build, in bytes of input read. :func:`redraws` says whether a progress line may be redrawn
in place (a terminal of known, usable width) or must be logged as plain lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TextIO

# a terminal narrower than this (0: some pseudo-terminals and CI logs say so) cannot show a redrawn
# progress line: tqdm draws nothing there, and a wrapped line cannot be redrawn in place
MIN_COLUMNS = 20


def line_width(stream: TextIO | None = None) -> int:
    """The columns of the terminal ``stream`` (default: stderr) writes to; 0 when it is not a
    terminal or its width is unknown."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream is None or not stream.isatty():
            return 0
        return max(os.get_terminal_size(stream.fileno()).columns, 0)
    except (AttributeError, OSError, ValueError):  # no fileno (captured), closed, or no size to ask
        return 0


def redraws(stream: TextIO | None = None) -> bool:
    """Whether progress on ``stream`` (default: stderr) may be one line redrawn in place (a tqdm bar,
    a ``\\r`` line): only on a terminal at least :data:`MIN_COLUMNS` wide. Elsewhere (a file, a pipe,
    a terminal of 0 or unknown columns) progress is plain lines, logged one after the other."""
    return line_width(stream) >= MIN_COLUMNS


class Rate:
    """Work per second over a sliding window of recent samples.

    ``add(now, done)`` records that ``done`` units (tokens) were complete at time ``now``
    (seconds, any clock). The rate is measured between the newest sample and the newest one at
    least ``window`` seconds older (or the oldest, early on), so once the pace has changed for
    ``window`` seconds plus one sample, the rate is the new pace.
    """

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, done: float) -> None:
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    @property
    def per_s(self) -> float | None:
        """Units per second, None before two samples."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / max(t1 - t0, 1e-9)

    def eta_s(self, left: float) -> float | None:
        """Seconds to do ``left`` more units at :attr:`per_s`, None while the rate is unknown or 0."""
        rate = self.per_s
        return None if not rate else left / rate


def clock(seconds: float | None) -> str:
    """Seconds as ``m:ss`` (or ``h:mm:ss``); ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


@contextlib.contextmanager
def heartbeat(what: str, log: Callable[[str], None] = print, every: float = 10.0) -> Iterator[None]:
    """While the block runs, every ``every`` seconds: ``<what>: still working, 20 s``. Nothing is
    printed for a block shorter than ``every``."""
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            log(f"{what}: still working, {time.monotonic() - t0:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def human_bytes(n: float) -> str:
    """Bytes in B, kB, MB, GB or TB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """Progress of a long data build in bytes: ``update(done, **counters)`` with ``done`` out of
    ``total``; ``close()`` at the end. Lines read ``{what} 1.20 GB of 20.00 GB (6%), 5.10 MB/s,
    ..., ETA 1:02:03``, the ETA the bytes left at the :class:`Rate` shown. Where stderr
    :func:`redraws`, the line is redrawn in place there; otherwise one line is logged every
    ``every`` seconds.

    A line drawn in place is ended (erased) before anything else is printed: by ``close()``, by
    the end of a ``with`` block, and at the latest when the Progress is dropped without either (a
    generator that returns early or is abandoned), so that the next message never continues it."""

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        *,
        every: float = 10.0,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.what, self.total, self.log, self.every, self.clock = what, total, log, every, clock
        self.tty = redraws(sys.stderr) if tty is None else tty
        self.drawn = False  # a line is on the terminal, not ended yet
        self.closed = False
        self.t0 = self.last_shown = clock()
        self.rate = Rate(window)
        self.rate.add(self.t0, 0)
        self.done = 0
        self.counters: dict[str, int] = {}

    def update(self, done: int, **counters: int) -> None:
        now = self.clock()
        self.done = done
        self.counters.update(counters)
        self.rate.add(now, done)
        if now - self.last_shown >= (0.5 if self.tty else self.every):
            self.last_shown = now
            self._show(self.line())

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        counts = "".join(f", {v:,} {k}" for k, v in self.counters.items())
        speed = human_bytes(self.rate.per_s or 0.0)
        eta = clock(self.rate.eta_s(max(self.total - self.done, 0)))
        return f"{self.what} {human_bytes(self.done)} of {human_bytes(self.total)}{pct}, {speed}/s{counts}, ETA {eta}"

    def _show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[2K{text}")
            sys.stderr.flush()
            self.drawn = True
        else:
            self.log(text)

    def end_line(self) -> None:
        """Erase the line drawn in place, if any: what is printed next starts a line of its own."""
        if self.drawn:
            self.drawn = False
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()

    def close(self) -> None:
        """End the line and log the summary: what was read, in how long, at what mean rate (once)."""
        self.end_line()
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.t0
        mean = human_bytes(self.done / elapsed if elapsed > 0 else 0.0)
        counts = "".join(f", {v:,} {k}" for k, v in self.counters.items())
        self.log(f"{self.what} {human_bytes(self.done)} in {clock(elapsed)} ({mean}/s){counts}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:  # interrupted or failed: no summary, but the next message starts on a line of its own
            self.end_line()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit stderr may be gone: nothing to end then
            self.end_line()
