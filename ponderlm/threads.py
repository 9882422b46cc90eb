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
   other work, the 1-minute load average rounded to whole cores, shared among the processes of one
   launch (torchrun's ``LOCAL_WORLD_SIZE``, or ``experiment pareto --jobs N``'s workers).

:func:`choose_threads` is the rule, a pure function of those numbers; :func:`pick` reads them from
the machine; :func:`use` applies a choice and :func:`describe` is the line that states it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """A thread count and, in words, why (``"--threads"``, ``"2 cores available, load 1.0 -> 1 free"``)."""

    n: int
    reason: str

    def line(self) -> str:
        return f"threads: {self.n} ({self.reason})"


def busy_cores(load: float) -> int:
    """Whole cores taken by other work: the load average rounded half up (0.4 -> 0, 0.6 -> 1)."""
    if not math.isfinite(load) or load <= 0:
        return 0
    return math.floor(load + 0.5)


def choose_threads(cores: int, load: float, procs: int = 1) -> Choice:
    """The rule: the free cores (``cores`` minus :func:`busy_cores` of ``load``, at least 1),
    divided among ``procs`` processes of this launch (at least 1 each).

    Args:
        cores: cores this process may run on (``len(os.sched_getaffinity(0))``).
        load: the 1-minute load average (``os.getloadavg()[0]``), other processes' work.
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


def load_average() -> float:
    """The 1-minute load average, 0.0 where the system has none."""
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
