"""Scatterbrain: exact attention on a local support, random features everywhere else, one normaliser
(docs/theory.md section 12).

  Y_n = [ sum_{m in E_n} e^{l_nm} v_m + sum_{m not in E_n} phi(x_n).phi(y_m) v_m ]
        / [ sum_{m in E_n} e^{l_nm} + sum_{m not in E_n} phi(x_n).phi(y_m) ]

The support E_n is the window of keys [lo_n, hi_n) of evalab.estimators.window: support "block", EVA's
block-local windows (the block of ``window`` positions holding n, as in the EVA authors' re-implementation);
"sliding", the keys m with m - n in [-floor(w/2), ceil(w/2)) (the Scatterbrain authors' SBLocalAttention), causal
the w keys ending at n. Causal: keys m <= n only, the random features over the past keys before the support.
window = 0 gives RFA, a support holding every key gives softmax.

The complement of an interval is a prefix [0, lo_n) and a suffix [hi_n, M); both are summed in log space over
blocks of queries with a carried state (the suffix on the reversed sequence), so no mass is ever subtracted
(the reference codes compute log(total - window) and guard it with eps or a clamp; here float32 stays finite
and exact at any norm). The draws are RFA's (noise kind "omega:<sampler>", layout (R, S, d), or (R, *b, S, d)
without shared noise): ev.compare runs
Scatterbrain and RFA of the same features on common random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .base import Cost
from .draw import Draw
from .features import OmegaDraws, log_features, num_columns
from .scaled import Scaled
from .window import KINDS
from .window import bounds, finite, local_attention, query_block, span


@dataclass(frozen=True)
class Scatterbrain(OmegaDraws):
    """Scatterbrain with an exact ``window`` on the local ``support`` and S = ``num_features`` omega draws
    (feature_map positive | hyperbolic; sampler iid | orthogonal | qmc) for the keys outside it.

    Call: est(q, k, v, draw) -> (R, *b, N, dv); draw noise omega (R, S, d), or (R, *b, S, d) with
    ``shared_noise=False`` (each batch element its own draw), shared with RFA of the same features.
    A window > 0 needs self-attention (N == M).
    """

    window: int = 32
    support: str = "block"
    num_features: int = 64
    feature_map: str = "positive"
    sampler: str = "iid"
    causal: bool = False
    shared_noise: bool = True
    scale: float | None = None

    def __post_init__(self) -> None:
        _checks.integer("window", self.window, minimum=0)
        _checks.choice("support", self.support, KINDS)
        self._check_omega_fields(("positive", "hyperbolic"))
        _checks.real("scale", self.scale, allow_none=True, strict=True)

    def bounds(self, N: int, M: int) -> tuple[np.ndarray, np.ndarray]:
        """The support of every query, keys [lo_n, hi_n) (causal: cut at n), both non-decreasing in n: (N,) each."""
        return bounds(self.window, self.support, N, M, causal=self.causal)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        omega = draw.for_estimator(self, q, k, inp.x)
        N, M = q.shape[-2], k.shape[-2]
        lo, hi = self.bounds(N, M)
        # (R, *b, L, F), contiguous: every later pass runs along positions
        lq, lk = (log_features(t, omega, self.feature_map).contiguous() for t in (inp.x, inp.y))
        block = self.query_block()
        parts = [local_attention(inp.x, inp.y, inp.v, lo, hi, block), _outside(lq, lk, inp.v, lo, block)]
        if not self.causal:
            # the suffix [hi_n, M) is a prefix of the reversed keys, for the reversed queries
            lse, average = _outside(lq.flip(-2), lk.flip(-2), inp.v.flip(-2), (M - hi)[::-1].copy(), block)
            parts.append((lse.flip(-1), average.flip(-2)))
        lse = torch.logsumexp(torch.stack(torch.broadcast_tensors(*(p[0] for p in parts))), dim=0)
        out = sum(torch.exp(part_lse - lse).unsqueeze(-1) * average for part_lse, average in parts)
        return out.to(inp.out_dtype)

    def query_block(self) -> int:
        """Queries per block of the support and of the prefix/suffix sums (memory R x block x block x F per step):
        evalab.estimators.window.query_block."""
        return query_block(self.window, self.support)

    @property
    def columns(self) -> int:
        """Number of feature columns F."""
        return num_columns(self.feature_map, self.num_features)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Deterministic: the support's logits and weights @ v, over blocks of T queries each gathering the span
        of keys its supports reach (the window for the block support, T - 1 + w for the sliding one):
        2 P (d + dv) with P = blocks x T x span, plus 4 elementwise per pair. Per replicate, matrix products as
        performed: the log-features of queries and keys (positive: 2 (N + M) S (d + 1), the half norm folded
        into the product; hyperbolic: 2 (N + M) S d, plus 2 (N + M) F elementwise to negate and subtract), and
        for the prefix (and, non-causal, the suffix) sums per block the carried state's mix (2 T F dv), the p
        pairs inside the block (2 T p dv) and the state update (2 F dv per key taken in). Elementwise terms
        added: 3 per pair-feature inside the blocks (add, exp, sum; T p F), 4 per query-feature for the mix
        with the state (4 T F) and 3 per key-feature taken into the state, per pass. Memory: the support's
        logits and gathered keys, the log-features, one block's pairs, the state and the output."""
        F = self.columns
        lo, hi = self.bounds(N, M)
        block = self.query_block()
        first, width = span(lo, hi, block)
        pairs = len(first) * block * width  # support logits over padded blocks of queries
        fixed = 2 * pairs * (d + dv) + 4 * pairs
        S = self.num_features
        rep = 2 * (N + M) * S * (d + 1) if self.feature_map == "positive" else 2 * (N + M) * (S * d + F)
        passes = [lo] if self.causal else [lo, (M - hi)[::-1]]
        for bound in passes:
            for t0 in range(0, N, block):
                t1 = min(N, t0 + block)
                T, p = t1 - t0, int(bound[t1 - 1] - bound[t0])
                rep += 2 * T * F * dv + 2 * T * p * dv + 3 * T * p * F + 4 * T * F
            rep += int(bound[(N - 1) // block * block]) * F * (2 * dv + 3)  # keys the state took in
        T = min(block, N)
        memory_fixed = 2 * pairs + len(first) * width * (d + dv) + N * dv
        memory = 2 * (N + M) * F + 2 * T * T * F + F * dv + 3 * N * dv
        return Cost.per_element(fixed, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)


def _outside(lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, lo: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-feature part over the prefix [0, lo_n) of the keys, lo non-decreasing:
    (log sum_{m < lo_n} phi(x_n).phi(y_m) (R, *b, N), the matching average of v (R, *b, N, dv)); -inf and 0
    where the prefix is empty.

    lq (R, *b, N, F), lk (R, *b, M, F) log-features, v (*b, M, dv). Blocks of ``block`` queries: a carried
    state (per column f: log_mass_f = log sum e^{lk_mf} and kv_f, the matching average of v) over the keys
    before the block's first bound, and the pairwise log-kernel logsumexp_f(lq_nf + lk_mf) for the keys from
    there to each query's own bound.
    """
    N, F = lq.shape[-2], lq.shape[-1]
    log_mass = torch.full_like(lk[..., :1, :], -math.inf)  # (R, *b, 1, F)
    kv = torch.zeros(*lk.shape[:-2], F, v.shape[-1], dtype=v.dtype, device=v.device)
    lse = torch.empty(lq.shape[:-1], dtype=lq.dtype, device=lq.device)
    out = torch.empty(*lq.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    end = 0  # the state holds keys [0, end)
    for t0 in range(0, N, block):
        t1 = min(N, t0 + block)
        a, b = int(lo[t0]), int(lo[t1 - 1])
        if a > end:  # advance the state to the block's first bound
            lk_new, v_new = lk[..., end:a, :], v[..., end:a, :]
            new_mass = torch.logaddexp(log_mass, torch.logsumexp(lk_new, dim=-2, keepdim=True))
            kv = torch.exp(log_mass - new_mass).transpose(-1, -2) * kv + torch.exp(lk_new - new_mass).transpose(-1, -2) @ v_new
            log_mass, end = new_mass, a
        lq_b = lq[..., t0:t1, :]
        logits = lq_b + log_mass  # (R, *b, T, F)
        if b > a:
            pair = torch.logsumexp(lq_b.unsqueeze(-2) + lk[..., a:b, :].unsqueeze(-3), dim=-1)  # (R, *b, T, b - a)
            beyond = torch.arange(a, b, device=lq.device) >= torch.from_numpy(lo[t0:t1]).to(lq.device).unsqueeze(-1)
            logits = torch.cat([logits, pair.masked_fill_(beyond, -math.inf)], dim=-1)
        block_lse = torch.logsumexp(logits, dim=-1)
        weights = (logits - finite(block_lse).unsqueeze(-1)).exp_()
        block_out = weights[..., :F] @ kv
        if b > a:
            block_out += weights[..., F:] @ v[..., a:b, :]
        lse[..., t0:t1], out[..., t0:t1, :] = block_lse, block_out
    return lse, out
