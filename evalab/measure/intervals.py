"""95% intervals: Student-t for means of iid replicates, grouped jackknife for smooth functions of
replicate sums, order statistics for quantiles."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided ``LEVEL`` interval [low, high]."""

    value: float
    low: float
    high: float

    def __repr__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@lru_cache(maxsize=None)
def _t(df: int) -> float:
    return float(stats.t.ppf(0.5 + LEVEL / 2, df)) if df > 0 else math.inf


def mean_interval(samples: np.ndarray) -> Estimate:
    """Mean of iid samples with a t interval (infinite half-width for a single sample)."""
    x = np.asarray(samples, dtype=np.float64)
    m = float(x.mean())
    half = _t(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else math.inf
    return Estimate(m, m - half, m + half)


def jackknife_interval(full: float, leave_one_out: np.ndarray) -> Estimate:
    """Interval for ``full`` from its G leave-one-group-out values (t with G - 1 degrees of freedom)."""
    loo = np.asarray(leave_one_out, dtype=np.float64)
    g = loo.size
    if g < 2:
        return Estimate(full, -math.inf, math.inf)
    se = math.sqrt((g - 1) / g * float(((loo - loo.mean()) ** 2).sum()))
    half = _t(g - 1) * se
    return Estimate(full, full - half, full + half)


def quantile_interval(samples: np.ndarray, q: float) -> Estimate:
    """Sample quantile with a distribution-free interval from binomial order statistics."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    lo = int(stats.binom.ppf((1 - LEVEL) / 2, n, q))
    hi = int(stats.binom.ppf(0.5 + LEVEL / 2, n, q)) + 1
    low = x[lo - 1] if lo >= 1 else -math.inf
    high = x[hi - 1] if hi <= n else math.inf
    return Estimate(float(np.quantile(x, q)), float(low), float(high))
