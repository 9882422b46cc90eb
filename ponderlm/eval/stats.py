"""Rank statistics for the depth analyses: ranks with ties, Pearson and Spearman correlation."""

from __future__ import annotations

import math

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x (n,), ties sharing the average of the ranks they span."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]  # (n,) start of each run of equal values
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)] - 1
    out = np.empty(len(x), dtype=np.float64)
    out[order] = ((starts + ends) / 2 + 1)[group]
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two (n,) arrays; None when either is constant (undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den == 0.0 or not math.isfinite(den):
        return None
    return float(np.clip(float(xc @ yc) / den, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled); None if undefined."""
    return pearson(ranks(x), ranks(y)) if len(x) >= 2 else None
