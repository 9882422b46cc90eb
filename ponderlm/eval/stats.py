"""Small statistics: ranks with ties, Pearson and Spearman correlation (the depth analyses) and the
t-distribution interval of a mean over seeds (experiment reports)."""

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


# two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30 (standard tables)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """t_{0.975}(df): the table up to 30 degrees of freedom, then the Cornish-Fisher expansion to
    second order, z + (z^3 + z) / (4 df) + (5z^5 + 16z^3 + 3z) / (96 df^2) (within 0.001 of the
    exact value for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``xs`` (0 for a single value)."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0


def ci95(xs: list[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean of ``xs`` (independent runs, t
    distribution with n - 1 degrees of freedom); None for fewer than two values."""
    n = len(xs)
    return t975(n - 1) * mean_std(xs)[1] / math.sqrt(n) if n > 1 else None
