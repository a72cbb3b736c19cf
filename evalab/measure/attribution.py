"""Variance attribution: how much each key's control-variate term ghat_m contributes to the error.

For one input and R draws, the variance over draws of ghat_m (trace over dv) for every query n and key m,
under each coefficient rule (shared = RFA, chunked, optimal = softmax, whose terms have zero variance).

Memory stays linear in the number of terms: with a_m = hbar_m - E[h_m],
ghat_m - E[h_m] v_m = a_m (v_m - beta_m) (docs/theory.md section 4), so the variance over draws of ghat_m
needs, per (n, m), only sum_r a_m, sum_r a_m beta_m and sum_r a_m^2 |v_m - beta_m|^2
= sum_r a_m^2 (|v_m|^2 - 2 v_m.beta_m + |beta_m|^2); these are accumulated on tiles of the (query, key) grid
and blocks of replicates, never R x N x M x dv at once.

The work: the key features of every replicate are computed once (and kept across blocks of queries when they
fit in memory), the query features and the shared beta once per block of queries; per tile, one GEMM per block
of replicates gives hbar = phi(x_n).phi(y_m) / Z_n, and contractions over the replicates of the weights
(a_m, a_m^2) with beta's coordinates and |beta|^2 give the sums. beta has
coordinates in value space (beta itself, dv numbers; the shared beta from the features, sum_m phi(y_m) v_m^T
once per replicate) or, for chunks of fewer than dv keys, in weight space (beta_c = sum_{m in P_c} w_m v_m with
w = hbar / sum_{P_c} hbar, chunk_size numbers, inner products through the chunk's Gram matrix V_c V_c^T).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import _checks
from ..estimators.control_variates import ControlVariates, chunk_coefficients, chunked
from ..estimators.features import num_columns
from ..estimators.scaled import Scaled
from .monte_carlo import NOISE_BLOCK, iter_draws

WORKING_SET = 128 * 2**20  # bytes a block of queries and replicates aims at (within max_memory)
TILE_KEYS = 1024  # keys per tile of the (query, key) grid, rounded down to a multiple of the chunk size


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
    Works on tiles of the (query, key) grid (blocks of queries by at most TILE_KEYS keys) and blocks of
    replicates (at most ``batch`` per block) within ``max_memory`` bytes (default 2 GiB), the two (*b, N, M)
    float64 results of the random rules included (the optimal rule's zeros are a broadcast view, no memory);
    raises a MemoryError when even one query, one replicate and one chunk of keys do not fit.
    """
    _checks.integer("replicates", replicates, minimum=2)
    _checks.qkv(q, k, v)
    batch = replicates if batch is None else _checks.integer("batch", batch)
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else _checks.real("max_memory", max_memory, strict=True)
    base = ControlVariates(num_features=num_features, **options)
    M = k.shape[-2]
    chunk = min(_checks.integer("chunk_size", chunk_size), M)
    inp = Scaled.of(q, k, v, base.scale)
    B, N, dv = math.prod(q.shape[:-2]), q.shape[-2], v.shape[-1]
    plan = _Plan.of(B, N, M, dv, num_columns(base.feature_map, num_features), chunk, min(batch, replicates),
                    replicates, inp.x.element_size(), max_memory)
    params = base.gerf_params(q, k)  # oprf/sderf/saderf: parameters from all queries, shared by the blocks
    values = inp.v.reshape(B, M, dv)
    omegas = [draw.for_estimator(base, q, k, inp.x) for _, draw in iter_draws(base, q, k, replicates, seed, plan.reps)]
    keys = [_Keys.of(base, inp, values, omega, params, keep=plan.keep) for omega in omegas]
    rules = {"shared": plan.shared, f"chunked ({chunk})": chunk}
    variance = {label: torch.empty(B, N, M, dtype=torch.float64) for label in rules}
    for n0 in range(0, N, plan.queries):
        x = inp.x[..., n0:n0 + plan.queries, :]
        logits = (x @ inp.y.transpose(-1, -2)).reshape(B, -1, M)
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        expected_h = logits.sub_(log_z).exp_()  # softmax weights E[h_m] (B, n, M)
        sides = [key.queries(base, x, omega, log_z, params) for key, omega in zip(keys, omegas)]
        for m0 in range(0, M, plan.tile):
            m1 = min(M, m0 + plan.tile)
            sums = {label: _Sums(values[:, m0:m1], size) for label, size in rules.items()}
            for key, omega, (scaled, beta) in zip(keys, omegas, sides):
                hbar = scaled.features @ key.tile(base, inp, omega, params, m0, m1).transpose(-1, -2)
                hbar.mul_(scaled.scale)  # (r, B, n, m)
                a = hbar - expected_h[..., m0:m1]
                a2 = a * a
                sum_a, sum_a2 = a.sum(0), a2.sum(0)  # (B, n, m), the same for every rule
                for sum_ in sums.values():
                    sum_.add(hbar, a, a2, sum_a, sum_a2, beta)
            for label, sum_ in sums.items():
                variance[label][:, n0:n0 + x.shape[-2], m0:m1] = sum_.variance(replicates)
    variance = {label: var.reshape(*q.shape[:-1], M) for label, var in variance.items()}
    # optimal: ghat_m = E[h_m] v_m whatever the draw, exactly zero variance (a read-only broadcast of one zero)
    variance["optimal"] = torch.zeros((), dtype=torch.float64).expand(*q.shape[:-1], M)
    return Attribution(variance, replicates)


@dataclass(frozen=True)
class _Keys:
    """The key side of a block of r replicates (B batch elements flattened): shift, the largest log-feature of
    each replicate (r, B, 1, 1); the features' sums against the values, sum_m phi(y_m) v_m^T (r, B, F, dv), and
    against 1 (r, B, F, 1) (shift left out of both); the features exp(log phi(y_m) - shift) (r, B, M, F) when
    kept (None: made again per tile)."""

    shift: torch.Tensor
    with_v: torch.Tensor
    total: torch.Tensor
    features: torch.Tensor | None

    @classmethod
    def of(cls, base: ControlVariates, inp: Scaled, values: torch.Tensor, omega: torch.Tensor, params, *,
           keep: bool) -> "_Keys":
        _, ly = base.log_features(inp.x[..., :0, :], inp.y, omega, params)
        ly = ly.reshape(omega.shape[0], *values.shape[:-1], -1)
        shift = ly.amax((-2, -1), keepdim=True)
        features = ly.sub_(shift).exp_()
        return cls(shift, features.transpose(-1, -2) @ values, features.sum(-2).unsqueeze(-1),
                   features if keep else None)

    def tile(self, base: ControlVariates, inp: Scaled, omega: torch.Tensor, params, m0: int, m1: int) -> torch.Tensor:
        """The features of keys m0 .. m1 - 1: (r, B, m, F)."""
        if self.features is not None:
            return self.features[..., m0:m1, :]
        _, ly = base.log_features(inp.x[..., :0, :], inp.y[..., m0:m1, :], omega, params)
        return ly.reshape(*self.shift.shape[:-2], m1 - m0, -1).sub_(self.shift).exp_()

    def queries(self, base: ControlVariates, x: torch.Tensor, omega: torch.Tensor, log_z: torch.Tensor, params):
        """For scaled queries x (*b, n, d) with log Z_n (B, n, 1): their scaled features (hbar = features @ key
        features^T * scale) and the shared beta (r, B, n, dv)."""
        lx, _ = base.log_features(x, x[..., :0, :], omega, params)
        lx = lx.reshape(omega.shape[0], *log_z.shape[:-1], -1)
        top = lx.amax(-1, keepdim=True)
        features = lx.sub_(top).exp_()
        return _Scaled(features, (top + self.shift - log_z).exp()), (features @ self.with_v) / (features @ self.total)


@dataclass(frozen=True)
class _Scaled:
    """Query features (r, B, n, F) and the factor (r, B, n, 1) that turns their products with key features into hbar."""

    features: torch.Tensor
    scale: torch.Tensor


class _Sums:
    """Per-(n, m) sums over replicates for one coefficient rule on a tile of keys, in chunked layout
    (B, n, C, size, .): contractions over r of the weights a and a^2 with beta's coordinates give sum a beta and
    sum a^2 beta, and with |beta|^2 sum a^2 |beta|^2. Coordinates: beta itself (dv numbers: the shared beta of
    all keys when ``size`` is None, else each chunk's) or, for size < dv, the chunk's weights
    w = hbar / sum_{P_c} hbar (size numbers, inner products through the Gram matrix V_c V_c^T)."""

    def __init__(self, v: torch.Tensor, size: int | None):
        """v (B, m, dv) the tile's values in the compute dtype; size: keys per chunk (None: the shared beta)."""
        self.v, self.M, self.shared = v, v.shape[-2], size is None
        self.size = self.M if size is None else size
        self.v_c = chunked(v.transpose(-1, -2), self.size).movedim(-3, -1)  # (B, C, size, dv)
        self.gram = self.v_c @ self.v_c.transpose(-1, -2) if self.size < v.shape[-1] and not self.shared else None
        self.sums = None

    def _chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(..., m) -> (..., C, size), a view when size divides m."""
        return t.unflatten(-1, (self.M // self.size, self.size)) if self.M % self.size == 0 else chunked(t, self.size)

    def add(self, hbar: torch.Tensor, a: torch.Tensor, a2: torch.Tensor, sum_a: torch.Tensor, sum_a2: torch.Tensor,
            beta: torch.Tensor) -> None:
        """hbar, a = hbar - E[h] and a^2: (r, B, n, m), and the sums of a and a^2 over r (B, n, m); beta
        (r, B, n, dv), the shared coefficient of all keys."""
        if self.gram is not None:
            h_c = self._chunks(hbar)
            coords = h_c / h_c.sum(-1, keepdim=True)  # (r, B, n, C, size)
            norm = torch.einsum("rbncs,bcst->rbnct", coords, self.gram).mul_(coords).sum(-1)
        else:
            coords = beta.unsqueeze(-2) if self.shared else chunk_coefficients(hbar, self.v, self.size)
            norm = (coords * coords).sum(-1)
        a_c, a2_c = self._chunks(a), self._chunks(a2)  # (r, B, n, C, size)
        sums = (torch.einsum("rbncs,rbncv->bncsv", a_c, coords), self._chunks(sum_a),
                torch.einsum("rbncs,rbncv->bncsv", a2_c, coords), self._chunks(sum_a2),
                (a2_c * norm.unsqueeze(-1)).sum(0))
        self.sums = sums if self.sums is None else tuple(acc.to(torch.float64).add_(t) for acc, t in zip(self.sums, sums))

    def variance(self, R: int) -> torch.Tensor:
        """(B, n, M) float64: (sum |u|^2 - |sum u|^2 / R) / (R - 1) for u = a (v - beta). The reductions over
        beta's coordinates run in the sums' dtype, the difference in float64."""
        sum_a_beta, sum_a, sum_a2_beta, sum_a2, sum_a2_norm = self.sums  # (B, n, C, size, D) and (B, n, C, size)
        if self.gram is None:  # value space: v_m's coordinates are v_m, the inner product the identity
            x = self.v_c.to(sum_a.dtype).unsqueeze(-4)  # (B, 1, C, size, dv)
            total = sum_a.unsqueeze(-1) * x - sum_a_beta  # sum_r u_r = v sum a - sum a beta
            total_sq = (total * total).sum(-1)
            v_sq, v_dot = (x * x).sum(-1), (x * sum_a2_beta).sum(-1)
        else:  # weight space: v_m's coordinates are the unit vector e_m, the inner product the Gram matrix
            gram = self.gram.to(sum_a.dtype).unsqueeze(-4)  # (B, 1, C, size, size)
            total = sum_a_beta.neg()
            total.diagonal(dim1=-2, dim2=-1).add_(sum_a)
            total_sq = ((total @ gram) * total).sum(-1)
            v_sq, v_dot = gram.diagonal(dim1=-2, dim2=-1), (sum_a2_beta @ gram).diagonal(dim1=-2, dim2=-1)
        f64 = lambda t: t.to(torch.float64)  # noqa: E731
        squares = f64(sum_a2) * f64(v_sq) - 2 * f64(v_dot) + f64(sum_a2_norm)
        var = (squares - f64(total_sq) / R) / (R - 1)
        return var.flatten(-2)[..., : self.M].clamp_min(0.0)


@dataclass(frozen=True)
class _Plan:
    """Blocks of key_variance: ``queries`` per block, keys per ``tile`` (a multiple of the chunk size),
    replicates per block (``reps``), whether the key features of all replicates are kept (``keep``), and the
    shared rule's chunk (``shared``)."""

    queries: int
    tile: int
    reps: int
    keep: bool
    shared: int | None  # the shared rule's chunk: None, the shared beta in value space; M, one tile of fewer keys
    # than dv, in weight space

    @classmethod
    def of(cls, B: int, N: int, M: int, dv: int, F: int, chunk: int, batch: int, R: int, itemsize: int,
           max_memory: float) -> "_Plan":
        """The largest blocks whose working set fits max_memory (aiming at WORKING_SET bytes): the two results, the
        values with their chunks and Gram matrices, the key sums (and features, of all R replicates when kept,
        else of one block per tile), per query its logits and the query features and shared beta of every
        replicate, the rules' sums on a tile (and their float64 copy over several blocks of replicates) with
        their finishing temporaries, and the (replicates, queries, tile) temporaries."""
        tile = min(M, max(chunk, TILE_KEYS // chunk * chunk))
        shared = M if tile == M and M < dv else None
        sizes = [shared, chunk]
        padded = [tile if s is None else math.ceil(tile / s) * s for s in sizes]
        coords = [dv if s is None else min(s, dv) for s in sizes]
        reps = min(batch, NOISE_BLOCK)
        sums = sum(p * (2 * D + 3) for p, D in zip(padded, coords))  # per query: the rules' accumulators
        finishing = sum(p * (2 * D * itemsize + 6 * 8) for p, D in zip(padded, coords))
        per_query = B * (2 * M * itemsize + R * (F + dv + 2) * itemsize + sums * (itemsize + 8) + finishing)
        # per query and replicate on a tile: hbar, a, a^2; per rule its padded chunks, the weights w (w, w G and
        # a^2 |beta|^2) and beta's coordinates with |beta|^2 per chunk; the query features
        per_query_rep = B * (3 * tile + sum(3 * (p - tile > 0) * p + 3 * (s is not None and s < dv) * p
                                            + 2 * (p // (s or p)) * (D + 1) for p, s, D in zip(padded, sizes, coords))
                             + 2 * F + 2 * dv) * itemsize
        per_key_rep = B * M * F * itemsize  # features of all keys
        making = B * M * F * itemsize  # per replicate, while the key sums are made
        room = (max_memory - 2 * B * N * M * 8 - B * M * dv * (3 * itemsize + 2 * 8)
                - R * B * F * (dv + 1) * itemsize)
        least = per_query + per_query_rep + B * tile * F * itemsize * 2 + making
        if room < least:
            raise MemoryError(
                f"key_variance needs about {(max_memory - room + least) / 2**30:.3g} GiB "
                f"(its two (*b, N, M) = {B} x {N} x {M} float64 results take {2 * B * N * M * 8 / 2**30:.3g} GiB), "
                f"over max_memory={max_memory / 2**30:.3g} GiB; raise max_memory or pass fewer queries or keys"
            )
        keep = room - R * per_key_rep - reps * making >= per_query + reps * per_query_rep
        if not keep:  # each tile makes its keys' features again
            reps = max(1, min(reps, int((room - per_query) // (per_query_rep + 2 * B * tile * F * itemsize + making))))
        room -= R * per_key_rep if keep else reps * (2 * B * tile * F * itemsize + making)
        budget = min(room, max(WORKING_SET, per_query + reps * per_query_rep))
        reps = max(1, min(reps, int((budget - per_query) // per_query_rep)))
        if reps == R:  # one block of replicates: no float64 copy of the sums
            per_query -= B * sums * 8
        queries = max(1, min(N, int(budget // (per_query + reps * per_query_rep))))
        return cls(queries, tile, reps, keep, shared)
