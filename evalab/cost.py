"""Cost model: FLOPs and memory of one estimator call, as a function of sizes and hyper-parameters.

Counting rule: a multiply-add is 2 FLOPs, every other elementwise operation on a large tensor (exp, add,
divide, max) 1 FLOP. Costs split into a deterministic part paid once per call and a part paid per replicate,
so sweeps can compare estimators at equal budget and the Monte-Carlo engine can size its batches.
Sizes: N queries, M keys, d feature size, dv value size, B = product of the batch/head dimensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .control_variates import ControlVariates
from .eva import EVA, QUERY_BLOCK_ELEMENTS
from .features import num_columns
from .rfa import CAUSAL_BLOCK, RFA
from .softmax import ATTENTION_BLOCK_ELEMENTS, Softmax


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes: ``fixed_*`` once per call, ``replicate_*`` per replicate (batch dims included)."""

    fixed_flops: float
    replicate_flops: float
    fixed_bytes: float
    replicate_bytes: float

    def flops(self, replicates: int = 1) -> float:
        """FLOPs of one call producing ``replicates`` estimates."""
        return self.fixed_flops + replicates * self.replicate_flops

    def bytes(self, replicates: int = 1) -> float:
        """Peak working memory (bytes) of one call producing ``replicates`` estimates, inputs excluded."""
        return self.fixed_bytes + replicates * self.replicate_bytes

    def as_dict(self) -> dict[str, float]:
        """Columns for result tables: flops and bytes per replicate (the deterministic part amortised once)."""
        return {"flops": self.fixed_flops + self.replicate_flops, "peak_bytes": self.fixed_bytes + self.replicate_bytes}


def estimate_cost(estimator, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
    """The Cost of ``estimator`` on q (batch, N, d), k (batch, M, d), v (batch, M, dv); itemsize 4 (float32) or 8.

    Estimators without a model here report NaN FLOPs and, as memory, their output only.
    """
    model = _MODELS.get(type(estimator), _unknown)
    fixed_f, rep_f, fixed_b, rep_b = model(estimator, N, M, d, dv)
    return Cost(batch * fixed_f, batch * rep_f, batch * itemsize * fixed_b, batch * itemsize * rep_b)


def _softmax(est: Softmax, N, M, d, dv):
    pairs = N * (M + 1) / 2 if est.causal else N * M
    flops = pairs * (2 * d + 2 * dv + 4)  # logits, weights @ v, max/sub/exp/sum
    block = min(N, max(1, ATTENTION_BLOCK_ELEMENTS // M)) * M  # at most; the fused kernel holds far less
    return flops, 0.0, block + N * dv, 0.0


def _rfa(est: RFA, N, M, d, dv):
    S, F = est.num_features, num_columns(est.feature_map, est.num_features)
    flops = 2 * (N + M) * S * d  # projections w.x
    flops += 2 * (N + M) * F * dv + 4 * (N + M) * F  # key averages, query mixture, feature/softmax elementwise
    if est.causal:
        T = min(CAUSAL_BLOCK, N)
        flops += N * T * (3 * F + 2 * dv) + 2 * N * F * dv  # within-block pairs, carried-state updates
        memory = 3 * (N + M) * F + T * T * F + 2 * F * dv + N * dv
    else:
        memory = 3 * (N + M) * F + F * dv + N * dv
    return 0.0, flops, 0.0, memory


def _eva(est: EVA, N, M, d, dv):
    w = min(est.window, N)
    fixed = memory_fixed = 0.0
    if w:
        fixed += N * w * (2 * d + 2 * dv + 4)
        memory_fixed += 2 * N * w + N * dv
    if not est.chunk_size:
        return fixed, 0.0, memory_fixed, 0.0
    C, S = math.ceil(M / est.chunk_size), est.samples_per_chunk
    fixed += (2 * N * M * d + 2 * N * M) if est.chunk_logit == "exact" else 2 * N * C * d + 2 * M * d
    rep = 2 * M * S * d + 4 * M * S + 2 * M * S * dv  # log xi per chunk, softmax, chunk averages
    memory = 3 * M * S + C * S * dv + N * dv
    rows = min(N, est.chunk_size)  # the fewest queries per block; blocks hold about QUERY_BLOCK_ELEMENTS
    if S == 1:
        rep += 2 * N * C * dv
        memory_fixed += 3 * C * max(rows, min(N, QUERY_BLOCK_ELEMENTS // C)) + N
    else:
        rep += 2 * N * C * S * (d + dv) + 4 * N * C * S  # query-dependent importance weights
        memory_fixed += 3 * QUERY_BLOCK_ELEMENTS + N
        memory += 3 * rows * C * S
    return fixed, rep, memory_fixed, memory


def _control_variates(est: ControlVariates, N, M, d, dv):
    S, F = est.num_features, num_columns(est.feature_map, est.num_features)
    fixed = 2 * N * M * d + 4 * N * M
    rep = 2 * (N + M) * S * d + 2 * (N + M) * F + 2 * N * M * F + 2 * N * M * dv + 3 * N * M
    return fixed, rep, 2 * N * M, 3 * (N + M) * F + 2 * N * M + N * dv * math.ceil(M / (est.chunk_size or M))


def _unknown(est, N, M, d, dv):
    return math.nan, math.nan, 0.0, N * dv


_MODELS = {Softmax: _softmax, RFA: _rfa, EVA: _eva, ControlVariates: _control_variates}
