"""Variance attribution: how much each key's control-variate term ghat_m contributes to the error.

For one input and R draws, the variance over draws of ghat_m (trace over dv) for every query n and key m,
under each coefficient rule (shared = RFA, chunked, optimal = softmax, whose terms have zero variance).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from . import _checks
from .estimators.control_variates import ControlVariates
from .monte_carlo import iter_draws


@dataclass(frozen=True)
class Attribution:
    """variance: coefficient label -> (*b, N, M) float64 variance of ghat_m over draws (trace over dv)."""

    variance: dict
    replicates: int

    def profile(self) -> pd.DataFrame:
        """Per-key variance averaged over queries (and batch): columns coefficient, key, variance."""
        rows = []
        for label, var in self.variance.items():
            per_key = var.flatten(0, -2).mean(0).numpy()
            rows.append(pd.DataFrame({"coefficient": label, "key": np.arange(per_key.size), "variance": per_key}))
        return pd.concat(rows, ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """Long format for heatmaps: coefficient, query, key, variance (batch averaged)."""
        rows = []
        for label, var in self.variance.items():
            grid = var.flatten(0, -3).mean(0).numpy() if var.dim() > 2 else var.numpy()
            n, m = np.indices(grid.shape)
            rows.append(pd.DataFrame({"coefficient": label, "query": n.ravel(), "key": m.ravel(), "variance": grid.ravel()}))
        return pd.concat(rows, ignore_index=True)


def key_variance(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_features: int = 16,
    chunk_size: int = 8,
    replicates: int = 256,
    seed: int = 0,
    batch: int = 64,
    **options,
) -> Attribution:
    """Variance of ghat_m over ``replicates`` shared draws for the shared, chunked and optimal coefficients.

    q (*b, N, d), k (*b, M, d), v (*b, M, dv); ``options`` (feature_map, sampler, scale, gerf_a) go to ControlVariates.
    """
    _checks.integer("replicates", replicates, minimum=2)
    base = ControlVariates(num_features=num_features, **options)
    rules = {
        "shared": base,
        f"chunked ({chunk_size})": replace(base, coefficient="chunked", chunk_size=chunk_size),
        "optimal": replace(base, coefficient="optimal"),
    }
    sums = {label: [0.0, 0.0, None] for label in rules}  # sum, sum of squares, shift (first replicate)
    for _, draw in iter_draws(base, q, k, replicates, seed, _checks.integer("batch", batch)):
        for label, est in rules.items():
            ghat = est.terms(q, k, v, draw).ghat.to(torch.float64)  # (b, *batch, N, M, dv)
            if sums[label][2] is None:
                sums[label][2] = ghat[0].clone()
            ghat = ghat - sums[label][2]
            sums[label][0] = sums[label][0] + ghat.sum(0)
            sums[label][1] = sums[label][1] + (ghat * ghat).sum(0).sum(-1)
    variance = {}
    for label, (s1, s2, _) in sums.items():
        var = (s2 - (s1 * s1).sum(-1) / replicates) / (replicates - 1)
        variance[label] = var.clamp_min(0.0).cpu()
    return Attribution(variance, replicates)
