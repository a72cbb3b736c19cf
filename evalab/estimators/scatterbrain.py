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
blocks of queries, each block with the running sums of the keys before it (the suffix on the reversed
sequence), all blocks at once, so no mass is ever subtracted
(the reference codes compute log(total - window) and guard it with eps or a clamp; here float32 stays finite
and exact while the keys' log-features span less than about 700, the range of the float64 running sums). The draws are RFA's (noise kind "omega:<sampler>", layout (R, S, d), or (R, *b, S, d)
without shared noise): ev.compare runs
Scatterbrain and RFA of the same features on common random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import _checks
from .base import Cost
from .draw import Draw
from .features import OmegaDraws, log_features, num_columns
from .scaled import Scaled
from .window import KINDS
from .window import bounds, finite, local_attention, query_block, span

#: Elements of the pairwise log-kernel (replicates x batch x queries x keys x feature columns) per group of
#: query blocks in the prefix/suffix sums.
PAIR_ELEMENTS = 2**22


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
    budget = "num_features"  # the parameter along which the error falls (evalab.testing)

    def exact_limit(self, N: int, M: int):
        """Exact for N = M: a window support holding every key (evalab.testing)."""
        return replace(self, window=2 * M) if N == M else None

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
        """Queries per block of the support and of the prefix/suffix sums: evalab.estimators.window.query_block."""
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
        for the prefix (and, non-causal, the suffix) sums, over B blocks of T queries padded to B T: the state's
        mix (2 B T F dv), the p pair keys of the block reaching furthest, for every block (2 B T p dv), and the
        segment sums over B segments padded to the longest, L keys (2 B L F dv). Elementwise terms added: 3 per
        pair-feature (add, exp, sum; B T p F), 4 per query-feature for the mix with the state (4 B T F), 3 per
        segment key-feature and 12 per state entry for the running sums (B F dv), per pass. Memory: the
        support's logits and gathered keys, the log-features, per pass the gathered segments, the states, the
        padded logits and weights, one group's pairs, and the output."""
        F = self.columns
        lo, hi = self.bounds(N, M)
        block = self.query_block()
        first, width = span(lo, hi, block)
        pairs = len(first) * block * width  # support logits over padded blocks of queries
        fixed = 2 * pairs * (d + dv) + 4 * pairs
        S = self.num_features
        rep = 2 * (N + M) * S * (d + 1) if self.feature_map == "positive" else 2 * (N + M) * (S * d + F)
        memory = 2 * (N + M) * F + 3 * N * dv
        for bound in [lo] if self.causal else [lo, (M - hi)[::-1]]:
            starts, reach, length = outside_geometry(bound, block)
            B = len(starts)
            rep += B * block * (2 * F * dv + 2 * reach * dv + 3 * reach * F + 4 * F) + B * length * F * (2 * dv + 3)
            rep += 12 * B * F * dv
            memory += 2 * B * length * F + 4 * B * F * dv + 3 * B * block * (F + reach) + min(B * block * reach * F, PAIR_ELEMENTS)
        memory_fixed = 2 * pairs + len(first) * width * (d + dv) + N * dv
        return Cost.per_element(fixed, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)


def outside_geometry(lo: np.ndarray, block: int) -> tuple[np.ndarray, int, int]:
    """The layout of the random-feature sums over the prefixes [0, lo_n), lo non-decreasing, for blocks of
    ``block`` queries: (a_j, the first bound of each block (B,); p, the most pair keys a block takes past a_j;
    L, the longest segment [a_{j-1}, a_j) of keys summed into the states)."""
    N = len(lo)
    first = lo[::block]
    reach = int((lo[np.minimum(np.arange(block, N + block, block), N) - 1] - first).max(initial=0))
    return first, reach, int(np.diff(first, prepend=0).max(initial=0))


def _outside(lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, lo: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-feature part over the prefix [0, lo_n) of the keys, lo non-decreasing:
    (log sum_{m < lo_n} phi(x_n).phi(y_m) (R, *b, N), the matching average of v (R, *b, N, dv)); -inf and 0
    where the prefix is empty.

    lq (R, *b, N, F), lk (R, *b, M, F) log-features, v (*b, M, dv). Blocks of ``block`` queries, all at once:
    block j mixes a state over the keys before its first bound a_j (per column f: log_mass_f = log sum e^{lk_mf}
    and kv_f, the matching average of v; see ``_prefix_states``) with the pairwise log-kernel
    logsumexp_f(lq_nf + lk_mf) for the keys from a_j to each query's own bound; groups of blocks keep the pairs
    within PAIR_ELEMENTS.
    """
    N, F, device = lq.shape[-2], lq.shape[-1], lq.device
    B, pad = -(-N // block), -N % block
    first, reach, _ = outside_geometry(lo, block)
    log_mass, kv = _prefix_states(lk, v, first)  # (R, *b, B, F), (R, *b, B, F, dv)
    lq = torch.nn.functional.pad(lq, (0, 0, 0, pad)).unflatten(-2, (B, block))  # (R, *b, B, T, F)
    if reach:
        key = torch.from_numpy(first).to(device).unsqueeze(-1) + torch.arange(reach, device=device)  # (B, p)
        bound = torch.from_numpy(np.pad(lo, (0, pad))).to(device).view(B, block, 1)
        beyond = key.unsqueeze(-2) >= bound  # (B, T, p): keys at or past the query's bound (padding: all)
        key = key.clamp_(max=lk.shape[-2] - 1)
    groups = max(1, PAIR_ELEMENTS // max(1, math.prod(lq.shape[:-3]) * block * reach * F))
    lse, out = [], []
    for j0 in range(0, B, groups):  # one group unless the pairs would exceed PAIR_ELEMENTS
        j1 = min(B, j0 + groups)
        lq_g = lq[..., j0:j1, :, :]
        logits = lq_g + log_mass[..., j0:j1, :].unsqueeze(-2)  # (R, *b, G, T, F)
        if reach:
            keys = key[j0:j1]
            pair = torch.logsumexp(lq_g.unsqueeze(-2) + lk[..., keys, :].unsqueeze(-3), dim=-1)  # (R, *b, G, T, p)
            logits = torch.cat([logits, pair.masked_fill(beyond[j0:j1], -math.inf)], dim=-1)
        group_lse = _logsumexp(logits)
        weights = (logits - finite(group_lse).unsqueeze(-1)).exp_()
        group_out = weights[..., :F] @ kv[..., j0:j1, :, :]
        if reach:
            group_out = group_out + weights[..., F:] @ v[..., keys, :]
        lse.append(group_lse)
        out.append(group_out)
    lse, out = torch.cat(lse, dim=-2), torch.cat(out, dim=-3)
    return lse.flatten(-2)[..., :N], out.flatten(-3, -2)[..., :N, :]


def _prefix_states(lk: torch.Tensor, v: torch.Tensor, first: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column f, over the keys [0, a_j) for every bound a_j of ``first`` (B,), non-decreasing: log_mass
    log sum_m e^{lk_mf} (R, *b, B, F) and kv, the matching average of v (R, *b, B, F, dv); -inf and 0 for no key.

    The keys fall into segments [a_{j-1}, a_j) (a_{-1} = 0), each summed with its own maximum as shift; the
    running masses over segments run in log space (logcumsumexp), the value sums as a float64 running sum.
    """
    M, F, dv, device = lk.shape[-2], lk.shape[-1], v.shape[-1], lk.device
    bounds = np.concatenate([[0], first])
    length = int(np.diff(bounds).max(initial=0))
    if length == 0:
        shape = (*lk.shape[:-2], len(first), F)
        return (torch.full(shape, -math.inf, dtype=lk.dtype, device=device),
                torch.zeros(*shape, dv, dtype=v.dtype, device=device))
    key = torch.from_numpy(bounds[:-1]).to(device).unsqueeze(-1) + torch.arange(length, device=device)  # (B, L)
    outside = (key >= torch.from_numpy(first).to(device).unsqueeze(-1)).unsqueeze(-1)  # (B, L, 1)
    key = key.clamp_(max=M - 1)
    lk_s = lk[..., key, :].masked_fill_(outside, -math.inf)  # (R, *b, B, L, F), a gathered copy
    top = finite(lk_s.amax(-2, keepdim=True))  # (R, *b, B, 1, F)
    weights = (lk_s - top).exp_()
    top = top.squeeze(-2)
    segment_mass = weights.sum(-2)  # (R, *b, B, F), relative to top
    segment_kv = torch.einsum("...blf,...blv->...bfv", weights, v[..., key, :])  # (R, *b, B, F, dv), relative to top
    log_mass = torch.logcumsumexp(_log_positive(segment_mass, segment_mass == 0, top), dim=-2)
    # kv_j = sum_{i <= j} e^{top_i - log_mass_j} segment_kv_i, as a float64 running sum shifted by the largest top
    # per column (exact while the keys' log-features span less than float64's exponent range, about 700)
    peak = top.amax(-2, keepdim=True)
    running = torch.cumsum(torch.exp(top - peak).unsqueeze(-1).double() * segment_kv.double(), dim=-3)
    total = torch.where(log_mass == -math.inf, peak, log_mass)  # no key yet: kv 0 (a zero sum times 1)
    kv = running * torch.exp(peak - total).unsqueeze(-1).double()
    return log_mass, kv.to(lk.dtype)


def _log_positive(t: torch.Tensor, nonpositive: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """log t + shift where t > 0, -inf at ``nonpositive``, with a zero gradient there (also for the nan that
    logcumsumexp's backward gives at -inf)."""
    return torch.where(nonpositive, -math.inf, torch.where(nonpositive, 1.0, t).log() + shift)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, -inf for a row of -inf (an empty set), with a zero gradient there instead
    of torch's nan."""
    empty = (logits == -math.inf).all(-1, keepdim=True)
    return torch.logsumexp(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty.squeeze(-1), -math.inf)


