"""Variance attribution: how much each key's control-variate term ghat_m contributes to the error.

For one input and R draws, the variance over draws of ghat_m (trace over dv) for every query n and key m,
under each coefficient rule (shared = RFA, chunked, optimal = softmax, whose terms have zero variance).

Memory stays linear in the number of terms: with a_m = hbar_m - E[h_m],
ghat_m - E[h_m] v_m = a_m (v_m - beta_m) (docs/theory.md section 4), so the variance over draws of ghat_m
needs, per (n, m), only sum_r a_m, sum_r a_m beta_m and sum_r a_m^2 |v_m - beta_m|^2
= sum_r a_m^2 (|v_m|^2 - 2 v_m.beta_m + |beta_m|^2); these are accumulated in blocks of queries and
replicates, never R x N x M x dv at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import _checks
from ..estimators.control_variates import ControlVariates, _chunk_coefficients, _chunked
from .monte_carlo import NOISE_BLOCK, iter_draws

WORKING_SET = 128 * 2**20  # bytes a block of queries and replicates aims at (within max_memory)


@dataclass(frozen=True)
class Attribution:
    """variance: coefficient label -> (*b, N, M) float64 variance of ghat_m over draws (trace over dv)."""

    variance: dict
    replicates: int

    def __repr__(self) -> str:
        shape = tuple(next(iter(self.variance.values())).shape) if self.variance else ()
        means = ", ".join(f"{label} {float(var.mean()):.3g}" for label, var in self.variance.items())
        return f"Attribution(replicates={self.replicates}, shape={shape}, mean variance: {means})"

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
    batch: int | None = None,
    max_memory: float | None = None,
    **options,
) -> Attribution:
    """Variance of ghat_m over ``replicates`` shared draws for the shared, chunked and optimal coefficients.

    q (*b, N, d), k (*b, M, d), v (*b, M, dv); ``options`` (feature_map, sampler, scale, gerf_a) go to ControlVariates.
    Works in blocks of queries and of replicates (at most ``batch`` replicates per block) within ``max_memory``
    bytes (default 2 GiB), the three (*b, N, M) float64 results included; raises a MemoryError when even one
    query and one replicate do not fit.
    """
    _checks.integer("replicates", replicates, minimum=2)
    _checks.qkv(q, k, v)
    batch = replicates if batch is None else _checks.integer("batch", batch)
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else _checks.real("max_memory", max_memory, strict=True)
    base = ControlVariates(num_features=num_features, **options)
    sizes = {"shared": k.shape[-2], f"chunked ({chunk_size})": _checks.integer("chunk_size", chunk_size)}
    B, N, M, dv = math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], v.shape[-1]
    queries, reps = _blocks(B, N, M, dv, num_features, min(batch, replicates), max_memory)
    draws = list(iter_draws(base, q, k, replicates, seed, reps))
    params = base.gerf_params(q, k)  # oprf/sderf/saderf: parameters from all queries, shared by the blocks
    variance = {label: torch.empty(*q.shape[:-1], M, dtype=torch.float64) for label in sizes}
    values = v.to(_checks.compute_dtype(q, k, v))
    for n0 in range(0, N, queries):
        qb = q[..., n0:n0 + queries, :]
        sums = {label: _Sums(values, size) for label, size in sizes.items()}
        for _, draw in draws:
            _, hbar, expected_h = base._kernel(qb, k, v, draw, params)
            for sum_ in sums.values():
                sum_.add(hbar, hbar - expected_h)
        for label, sum_ in sums.items():
            variance[label][..., n0:n0 + queries, :] = sum_.variance(replicates).cpu()
    # optimal: ghat_m = E[h_m] v_m whatever the draw, exactly zero variance
    variance["optimal"] = torch.zeros(*q.shape[:-1], M, dtype=torch.float64)
    return Attribution(variance, replicates)


class _Sums:
    """Per-(n, m) float64 sums over replicates for one coefficient rule with chunks of ``size`` keys, in chunked
    layout (*b, n, C, size, .): one contraction over r of the weights (a, a^2) with (beta, 1, |beta|^2) gives
    sum a beta, sum a, sum a^2 beta, sum a^2 and sum a^2 |beta|^2 at once."""

    def __init__(self, v: torch.Tensor, size: int):
        self.v, self.size, self.M = v, size, v.shape[-2]
        self.sums = 0.0

    def add(self, hbar: torch.Tensor, a: torch.Tensor) -> None:
        """hbar and a = hbar - E[h]: (r, *b, n, M), in the compute dtype."""
        beta = _chunk_coefficients(hbar, self.v, self.size)  # (r, *b, n, C, dv)
        a_c = _chunked(a, self.size)  # (r, *b, n, C, size)
        weights = torch.cat([a_c, a_c * a_c], dim=-1)
        columns = torch.cat([beta, torch.ones_like(beta[..., :1]), (beta * beta).sum(-1, keepdim=True)], dim=-1)
        self.sums = self.sums + torch.einsum("r...ncs,r...ncv->...ncsv", weights, columns).to(torch.float64)

    def variance(self, R: int) -> torch.Tensor:
        """(*b, n, M): (sum |u|^2 - |sum u|^2 / R) / (R - 1) for u = a (v - beta)."""
        v_c = _chunked(self.v.to(torch.float64).transpose(-1, -2), self.size).movedim(-3, -1).unsqueeze(-4)
        first, second = self.sums.split(self.size, dim=-2)  # weights a and a^2: (*b, n, C, size, dv + 2) each
        dv = v_c.shape[-1]
        total = first[..., dv].unsqueeze(-1) * v_c - first[..., :dv]  # sum_r u_r = v sum a - sum a beta
        squares = second[..., dv] * (v_c * v_c).sum(-1) - 2 * (v_c * second[..., :dv]).sum(-1) + second[..., dv + 1]
        var = (squares - (total * total).sum(-1) / R) / (R - 1)
        return var.flatten(-2)[..., : self.M].clamp_min(0.0)


def _blocks(B: int, N: int, M: int, dv: int, S: int, batch: int, max_memory: float) -> tuple[int, int]:
    """(queries, replicates) per block: the three results, the two rules' sums for a block of queries and the
    (replicates, queries, M) temporaries within max_memory, aiming at WORKING_SET bytes."""
    result = 3 * B * N * M * 8
    per_query = B * M * (7 * dv + 8) * 8  # two rules' sums (2 (dv + 2) each) and the finishing temporaries (3 dv)
    per_query_rep = B * (10 * M + 4 * S) * 8  # hbar, a, chunked copies, v.beta, products; the query features
    room = max_memory - result - B * M * (4 * S + 3 * dv) * 8  # the keys' features, v
    reps = min(batch, NOISE_BLOCK)
    if room < per_query + per_query_rep:
        raise MemoryError(
            f"key_variance needs about {(max_memory - room + per_query + per_query_rep) / 2**30:.3g} GiB "
            f"(its three (*b, N, M) = {B} x {N} x {M} float64 results take {result / 2**30:.3g} GiB), over "
            f"max_memory={max_memory / 2**30:.3g} GiB; raise max_memory or pass fewer queries or keys"
        )
    budget = min(room, max(WORKING_SET, per_query + reps * per_query_rep))
    reps = max(1, min(reps, int((budget - per_query) // per_query_rep)))
    queries = max(1, min(N, int(budget // (per_query + reps * per_query_rep))))
    return queries, reps
