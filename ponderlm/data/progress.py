"""Progress of a long data build: how far, how fast, and when it will end.

The rate is measured over a sliding window of the last ``window`` seconds (not since the start),
and the ETA is the remaining work divided by that same rate, so the two shown always agree and both
follow the build as it speeds up or slows down. On a terminal the line is redrawn in place on
stderr; otherwise (a log file, CI) one line is logged every ``every`` seconds.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = round(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """``update(done, **counters)`` with ``done`` out of ``total`` (bytes); ``close()`` at the end.
    Lines read ``{what} 1.2 GB of 20 GB (6%), 5.1 MB/s, ..., ETA 1h02m``."""

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
        self.what, self.total, self.log, self.every, self.window, self.clock = what, total, log, every, window, clock
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = clock()
        self.samples: deque[tuple[float, int]] = deque([(self.t0, 0)])
        self.last_shown = self.t0
        self.done = 0
        self.counters: dict[str, int] = {}

    def rate(self) -> float:
        """Bytes per second over the last ``window`` seconds (0 before there is a measurement)."""
        (t_old, d_old), (t_new, d_new) = self.samples[0], self.samples[-1]
        return (d_new - d_old) / (t_new - t_old) if t_new > t_old else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        return max(self.total - self.done, 0) / r if r > 0 else None

    def update(self, done: int, **counters: int) -> None:
        now = self.clock()
        self.done = done
        self.counters.update(counters)
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        if now - self.last_shown >= (0.5 if self.tty else self.every):
            self.last_shown = now
            self._show(self.line())

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = self.eta()
        counts = "".join(f", {v:,} {k}" for k, v in self.counters.items())
        left = human_seconds(eta) if eta is not None else "?"
        return f"{self.what} {human_bytes(self.done)} of {human_bytes(self.total)}{pct}, " + (
            f"{human_bytes(self.rate())}/s{counts}, ETA {left}"
        )

    def _show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[2K{text}")
            sys.stderr.flush()
        else:
            self.log(text)

    def close(self) -> None:
        if self.tty and self.last_shown > self.t0:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        elapsed = self.clock() - self.t0
        mean = self.done / elapsed if elapsed > 0 else 0.0
        counts = "".join(f", {v:,} {k}" for k, v in self.counters.items())
        self.log(f"{self.what} {human_bytes(self.done)} in {human_seconds(elapsed)} ({human_bytes(mean)}/s){counts}")
