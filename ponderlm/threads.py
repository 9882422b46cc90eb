"""How many intra-op threads torch uses on the CPU, chosen from the cores that are actually free.

torch's default is one thread per physical core. On a machine that is doing other things that
oversubscribes it: on 2 cores beside one busy process, training fell from about 3,500 to about
640 tokens/s (the threads wait on each other at every barrier). So every command that computes
picks its thread count here and says which and why, in one line.

Who decides, first match wins:

1. ``--threads N`` on the command line;
2. ``train.threads`` in the run's config (``ponderlm train``);
3. ``OMP_NUM_THREADS`` in the environment (what a cluster launcher or a shell already chose);
4. the cores free now: the cores this process may run on (``os.sched_getaffinity``) minus the
   other work (the CPU other processes use now, sampled for a tenth of a second from ``/proc/stat``,
   rounded to whole cores; the 1-minute load average where there is no ``/proc/stat``), shared
   among the processes of one launch (torchrun's ``LOCAL_WORLD_SIZE``, or ``experiment pareto
   --jobs N``'s workers).

:func:`choose_threads` is the rule, a pure function of those numbers; :func:`pick` reads them from
the machine; :func:`use` applies a choice and :func:`describe` is the line that states it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """A thread count and, in words, why (``"--threads"``, ``"2 cores available, load 1.0 -> 1 free"``)."""

    n: int
    reason: str

    def line(self) -> str:
        return f"threads: {self.n} ({self.reason})"


def busy_cores(load: float) -> int:
    """Whole cores taken by other work: the load rounded half up (0.4 -> 0, 0.6 -> 1)."""
    if not math.isfinite(load) or load <= 0:
        return 0
    return math.floor(load + 0.5)


def choose_threads(cores: int, load: float, procs: int = 1) -> Choice:
    """The rule: the free cores (``cores`` minus :func:`busy_cores` of ``load``, at least 1),
    divided among ``procs`` processes of this launch (at least 1 each).

    Args:
        cores: cores this process may run on (``len(os.sched_getaffinity(0))``).
        load: other processes' work in cores (:func:`load_average`).
        procs: processes that share these cores in this launch (torchrun ranks on this node).
    Returns:
        the thread count of one process and the reason, e.g. ``2 cores available, load 1.0 -> 1 free``.
    """
    cores = max(1, int(cores))
    procs = max(1, int(procs))
    free = max(1, cores - busy_cores(load))
    n = max(1, free // procs)
    reason = f"{cores} core{'s' if cores != 1 else ''} available, load {load:.1f} -> {free} free"
    if procs > 1:
        reason += f", shared by {procs} processes"
    return Choice(n, reason)


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


LOAD_SAMPLE_S = 0.1  # how long other processes' CPU use is sampled for (10 ticks of /proc/stat)


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU time of the whole machine and of this process, at one moment (seconds)."""

    machine_busy: float
    own: float
    at: float


def cpu_sample() -> CpuSample | None:
    """The machine's busy CPU seconds (``/proc/stat``: all but idle and iowait) and this process's
    own (``os.times``); None where ``/proc/stat`` is not there."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return CpuSample(busy, t.user + t.system, time.monotonic())


def busy_elsewhere(a: CpuSample, b: CpuSample) -> float:
    """Cores' worth of CPU that other processes used between two samples (this process's own use
    taken out)."""
    elapsed = b.at - a.at
    if elapsed <= 0:
        return 0.0
    return max(0.0, ((b.machine_busy - a.machine_busy) - (b.own - a.own)) / elapsed)


def load_average() -> float:
    """Other processes' CPU load now, in cores: sampled for ``LOAD_SAMPLE_S`` from ``/proc/stat``
    less this process's own use. (The 1-minute load average, the fallback where ``/proc/stat`` is
    not there, lags by a minute and counts this process's own earlier work: a quickstart's second
    model saw its first as a neighbour and took one thread on an idle machine.)"""
    a = cpu_sample()
    if a is not None:
        time.sleep(LOAD_SAMPLE_S)
        b = cpu_sample()
        if b is not None:
            return busy_elsewhere(a, b)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _env_threads(env) -> int | None:
    """OMP_NUM_THREADS as a positive integer, None when unset or unusable."""
    text = (env.get("OMP_NUM_THREADS") or "").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None


def pick(requested: int | None = None, source: str = "--threads", *, procs: int | None = None, env=None) -> Choice:
    """The thread count for this process: ``requested`` (from ``source``) when given (> 0), else
    OMP_NUM_THREADS, else :func:`choose_threads` on this machine's cores and load, shared by
    ``procs`` processes (default: torchrun's LOCAL_WORLD_SIZE, else 1)."""
    env = os.environ if env is None else env
    if requested:
        return Choice(int(requested), source)
    omp = _env_threads(env)
    if omp is not None:
        return Choice(omp, "OMP_NUM_THREADS")
    if procs is None:
        procs = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    return choose_threads(available_cores(), load_average(), procs)


_applied: Choice | None = None  # the last choice use() applied, for describe()


def use(choice: Choice) -> Choice:
    """Set torch's intra-op threads to ``choice.n`` and remember why."""
    import torch

    global _applied
    torch.set_num_threads(choice.n)
    _applied = choice
    return choice


def describe() -> str:
    """One line: the threads torch uses now and why (the last :func:`use`, if nothing changed them since)."""
    import torch

    n = torch.get_num_threads()
    if _applied is not None and _applied.n == n:
        return _applied.line()
    return Choice(n, "PyTorch's default").line()
