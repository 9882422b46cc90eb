"""Progress that tells the truth: one measured rate, and the ETA derived from that same rate.

:class:`Rate` is the tokens/s a progress line shows, measured over the last ``window`` seconds (so
it follows the machine as it gets busier or quieter), and the ETA is the work left divided by it:
the two numbers on a line can never disagree. :func:`heartbeat` prints a line every ``every``
seconds while a step that shows no progress of its own (a package download) is running.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator


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
