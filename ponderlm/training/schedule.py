"""The schedules of a training run, pure functions of the step: the learning rate (linear warmup,
then cosine) and the Jacobi curriculum. Every rank, and a run resumed at any step, computes the
same values as an uninterrupted single process."""

from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.lr * cfg.min_lr_ratio at cfg.max_steps (1-based)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def jacobi_iters_at(step: int, seed: int, choices: tuple[int, ...]) -> int:
    """The Jacobi curriculum: J for step s, drawn uniformly, identical on every rank."""
    return int(np.random.default_rng([seed, step, 7]).choice(list(choices)))
