"""Scatterbrain: exact attention on a local support, random features everywhere else, one normaliser
(docs/theory.md section 12).

  Y_n = [ sum_{m in E_n} e^{l_nm} v_m + sum_{m not in E_n} phi(x_n).phi(y_m) v_m ]
        / [ sum_{m in E_n} e^{l_nm} + sum_{m not in E_n} phi(x_n).phi(y_m) ]

The support E_n is the window of keys [lo_n, hi_n) of evalab.estimators.window: support "block", EVA's
block-local windows (the block of ``window`` positions holding n, as in the EVA authors' re-implementation);
"sliding", the keys m with m - n in [-floor(w/2), ceil(w/2)) (the Scatterbrain authors' SBLocalAttention), causal
the w keys ending at n. Causal: keys m <= n only, the random features over the past keys before the support.
window = 0 gives RFA, a support holding every key gives softmax.

The keys outside the support of a block of queries fall into segments; per segment and feature column f the
keys' masses sum_m phi_f(y_m) and value sums sum_m phi_f(y_m) v_m form a state, and a block's state is
the total less its own segments (causal: a running sum over the segments before it). Each query then takes one
softmax over its window's logits, its block's state columns log phi_f(x_n) + log mass_f and the log-kernels
of the few keys between its own support and its block's (the "pairs", sliding supports only), applied to the
window's values, the state averages and the pairs' values: Scatterbrain at the cost of RFA plus the window.
The subtraction is the reference codes' log(total - window), without their eps or clamp: it errs by the compute
dtype's rounding of each column's total, so the output errs by that rounding of the random-feature mass of the
whole row relative to its normaliser (see ``_states``); masses stay positive, and a full support is softmax.
The draws are RFA's (noise kind "omega:<sampler>", layout (R, S, d), or (R, *b, S, d) without shared noise):
ev.compare runs Scatterbrain and RFA of the same features on common random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import _checks
from .base import Cost
from .draw import Draw
from .features import OmegaDraws, num_columns, stacked_projection
from .scaled import Scaled
from .window import KINDS
from .window import bounds, query_block, span, window_blocks

#: Elements of the pairwise log-kernel (replicates x batch x queries x keys x feature columns) per group of
#: query blocks in the prefix/suffix sums.
PAIR_ELEMENTS = 2**22
#: On CPU, logits (replicates x batch x queries x (window + feature columns + pairs)) per group of query blocks.
MIX_ELEMENTS = 2**20
#: Per compute dtype, the fraction of a column's total below which its mass outside a block's support is rounding
#: of the subtraction that computes it (64 units of rounding), and counts as no mass.
OUTSIDE_FLOOR = {dtype: 64 * torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


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
        block = self.query_block()
        geometry = Complement.of(lo, hi, block, M, self.causal)
        lk = _log_features(inp.y, omega, self.feature_map)  # (R, *b, M, F)
        log_mass, kv = _states(lk, inp.v, geometry, inplace=inp.inplace)
        out = _mix(inp, omega, self.feature_map, lk, lo, hi, block, geometry, log_mass, kv)
        return out.to(inp.out_dtype)

    def query_block(self) -> int:
        """Queries per block of the support and of the prefix/suffix sums: evalab.estimators.window.query_block."""
        return query_block(self.window, self.support)

    @property
    def columns(self) -> int:
        """Number of feature columns F."""
        return num_columns(self.feature_map, self.num_features)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Deterministic: the support's logits, 2 P d with P = blocks x T x span pairs, over blocks of T queries
        each gathering the span of keys its supports reach (the window for the block support, T - 1 + w for the
        sliding one). Per replicate, matrix products as performed: the log-features of queries and keys
        (positive: 2 (N + M) S (d + 1), the half norm folded into the product; hyperbolic: 2 (N + M) S d, plus
        2 (N + M) F elementwise to negate and subtract); the segment sums of the keys outside the supports with
        their masses (:class:`Complement`: C segments padded to the longest, L keys; 2 C L F (dv + 1)); the
        support's weights @ v (2 P dv), and per block (B blocks of T queries) the state's (2 B T F dv) and its
        p pair keys' (2 B T p dv). Elementwise terms added: 4 per support pair (mask, subtract, exp, sum), 3 per
        segment key-feature (subtract, exp), 6 per segment state entry and 4 per block state entry for the
        outside sums (C F dv, B F dv), 3 per pair-feature (add, exp, sum; B T p F) and 4 per query-column
        (B T (F + p)). Memory: the support's logits and gathered keys, the log-features, the gathered segments
        and their weights, the segment and block states, one group's logits, pairs and weights, the output."""
        F = self.columns
        lo, hi = self.bounds(N, M)
        block = self.query_block()
        first, width = span(lo, hi, block)
        pairs = len(first) * block * width  # support logits over padded blocks of queries
        S = self.num_features
        rep = 2 * (N + M) * S * (d + 1) if self.feature_map == "positive" else 2 * (N + M) * (S * d + F)
        geometry = Complement.of(lo, hi, block, M, self.causal)
        B, C, L, p = len(geometry.starts), geometry.segments, geometry.length, geometry.reach
        rep += 2 * C * L * F * (dv + 1) + 2 * pairs * dv + 2 * B * block * (F + p) * dv
        rep += (4 * pairs + 3 * C * L * F + 6 * C * F * dv + 4 * B * F * dv + 3 * B * block * p * F
                + 4 * B * block * (F + p))
        group = min(B * block * (width + F + p), MIX_ELEMENTS)
        memory = (2 * (N + M) * F + N * dv + 2 * C * L * F + 2 * C * F * (dv + 1) * (8 // itemsize if self.causal else 1)
                  + B * F * (dv + 1) + 3 * group + min(B * block * p * F, PAIR_ELEMENTS))
        memory_fixed = pairs + len(first) * width * (d + dv)
        return Cost.per_element(2 * pairs * d, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)


@dataclass(frozen=True)
class Complement:
    """Where the keys outside the supports [lo_n, hi_n) lie, for blocks of ``block`` queries (numpy, no tensor).

    Block j (queries j T .. j T + T - 1) shares the prefix [0, a_j) and, unless causal, the suffix [h_j, M):
    a_j = the first query's lo, h_j = the last query's hi. The keys those leave to each query, [a_j, lo_n) and
    [hi_n, h_j), are its pairs (at most ``reach`` per query, both sides together). The keys fall into
    ``segments`` at the cuts {0, M} and every a_j and h_j; the prefix of block j is the segments before
    ``prefix_end[j]``, its suffix the segments from ``suffix_start[j]`` on.
    """

    starts: np.ndarray  # a_j (B,)
    ends: np.ndarray  # h_j (B,); M when causal (no suffix)
    cuts: np.ndarray  # segment boundaries (S + 1,), 0 and M included
    prefix_end: np.ndarray  # (B,) segment index of a_j
    suffix_start: np.ndarray  # (B,) segment index of h_j
    before: int  # the most prefix pairs a query of a block has, max lo_n - a_j
    after: int  # the most suffix pairs, max h_j - hi_n
    length: int  # the longest segment
    causal: bool

    @classmethod
    def of(cls, lo: np.ndarray, hi: np.ndarray, block: int, M: int, causal: bool) -> "Complement":
        N = len(lo)
        last = np.minimum(np.arange(block, N + block, block), N) - 1
        starts = lo[::block]
        ends = np.full_like(starts, M) if causal else hi[last]
        blocks = np.arange(N) // block
        cuts = np.unique(np.concatenate([[0, M], starts, ends]))
        before = int((lo - starts[blocks]).max(initial=0))
        after = int((ends[blocks] - hi).max(initial=0)) if not causal else 0
        return cls(starts, ends, cuts, np.searchsorted(cuts, starts), np.searchsorted(cuts, ends), before, after,
                   int(np.diff(cuts).max(initial=0)), causal)

    @property
    def reach(self) -> int:
        """Pair keys per query: before + after."""
        return self.before + self.after

    @property
    def segments(self) -> int:
        """Number of segments S."""
        return len(self.cuts) - 1


def _mix(inp: Scaled, omega: torch.Tensor, feature_map: str, lk: torch.Tensor, lo: np.ndarray, hi: np.ndarray,
         block: int, geometry: Complement, log_mass: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The output (R, *b, N, dv): per query one softmax over its window's logits x_n.y_m, its block's state
    columns log phi_f(x_n) + log_mass_f (``_states``) and its pairs' log-kernels logsumexp_f(lq_nf + lk_mf),
    applied to the window's values, the state averages kv_f and the pairs' values.

    Over groups of blocks of ``block`` queries (on CPU at most MIX_ELEMENTS logits per group, so each group's
    temporaries stay in cache; with pairs, at most PAIR_ELEMENTS pair log-kernel terms), the queries'
    log-features made per group. lk (R, *b, M, F) from :func:`_log_features`; log_mass (R, *b, B, F),
    kv (R, *b, B, F, dv)."""
    x, v, inplace = inp.x, inp.v, inp.inplace
    N, F, device = x.shape[-2], lk.shape[-1], x.device
    xb, keys, values, inside = window_blocks(x, inp.y, v, lo, hi, block)  # (*b, B, T, d), (*b, B, w, .)
    B, width, reach = xb.shape[-3], keys.shape[-2], geometry.reach
    if reach:  # pair keys: a_j + i for i < before, then h_j - after + i for i < after
        pad = B * block - N
        offsets = np.concatenate([geometry.starts[:, None] + np.arange(geometry.before),
                                  geometry.ends[:, None] - geometry.after + np.arange(geometry.after)], axis=1)
        lo_p, hi_p = (np.pad(t, (0, pad)).reshape(B, block, 1) for t in (lo, hi))
        pair_in = np.concatenate([offsets[:, None, :geometry.before] < lo_p,
                                  offsets[:, None, geometry.before:] >= hi_p], axis=-1)  # (B, T, p)
        pair_in[N // block:, (N % block or block):] = False  # padding rows: no pair
        beyond = torch.from_numpy(~pair_in).to(device)
        key = torch.from_numpy(offsets.clip(0, lk.shape[-2] - 1)).to(device)  # (B, p)
    rows = math.prod(lk.shape[:-2]) * block  # logits rows per block
    groups = B if device.type != "cpu" else max(1, MIX_ELEMENTS // (rows * (width + F + reach)))
    if reach:
        groups = min(groups, max(1, PAIR_ELEMENTS // (rows * reach * F)))
    state = log_mass - math.log(F)  # the 1/F of phi(x).phi(y), which _log_features leaves out
    out = torch.empty(*lk.shape[:-2], B, block, v.shape[-1], dtype=v.dtype, device=device)
    for j0 in range(0, B, groups):
        j1 = min(B, j0 + groups)
        xb_g = xb[..., j0:j1, :, :]
        local = xb_g @ keys[..., j0:j1, :, :].transpose(-1, -2)  # (*b, G, T, w)
        if lk.shape[0] == 1:  # one replicate: the replicate axis of the other parts
            local = local.unsqueeze(0)
        if inside is not None:
            local = local.masked_fill(~inside[j0:j1], -math.inf)
        lq = _log_features(xb_g.flatten(-3, -2), omega, feature_map).unflatten(-2, xb_g.shape[-3:-1])  # (R, *b, G, T, F)
        parts = [(local, values[..., j0:j1, :, :])]
        if reach:
            keys_p = key[j0:j1]
            pair = torch.logsumexp(lq.unsqueeze(-2) + lk[..., keys_p, :].unsqueeze(-3), dim=-1)  # (R, *b, G, T, p)
            parts.append(((pair - math.log(F)).masked_fill(beyond[j0:j1], -math.inf), v[..., keys_p, :]))
        columns = lq.add_(state[..., j0:j1, :].unsqueeze(-2)) if inplace else lq + state[..., j0:j1, :].unsqueeze(-2)
        parts.append((columns, kv[..., j0:j1, :, :]))
        # one softmax over the parts' logits without concatenating them; every row has a key, inside or outside
        top = torch.stack(torch.broadcast_tensors(*(logits.amax(-1, keepdim=True) for logits, _ in parts))).amax(0)
        group = total = None
        for logits, vals in parts:
            weights = logits.sub_(top).exp_() if inplace and logits.dim() == top.dim() else (logits - top).exp()
            term, mass = weights @ vals, weights.sum(-1, keepdim=True)  # fresh: accumulated in place
            group, total = (term, mass) if group is None else (group.add_(term), total.add_(mass))
        out[..., j0:j1, :, :] = group.div_(total)
    return out.flatten(-3, -2)[..., :N, :]


def _log_features(x: torch.Tensor, omega: torch.Tensor, feature_map: str) -> torch.Tensor:
    """log phi(x) + log(F) / 2 (the constant left to the callers): x (*b, N, d) -> (R, *b, N, F), a view of one
    (*b, N, R, F) projection."""
    return stacked_projection(x, omega, feature_map, minus_half_norm=True).movedim(-2, 0)


def _states(lk: torch.Tensor, v: torch.Tensor, geometry: Complement, *,
            inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block j and column f, over the keys outside its segments [prefix_end[j], suffix_start[j]) (causal:
    the segments before prefix_end[j]): log_mass log sum_m e^{lk_mf} (R, *b, B, F) and kv, the matching average
    of v (R, *b, B, F, dv); -inf and 0 for no key. Keys tiling [0, M) in equal segments are a view, no gathered
    copy.

    Non-causal, the outside of a block is the total less its own segments, in the compute dtype, every key
    shifted by its column's largest log-feature: the subtraction errs by the dtype's rounding of the column's
    total, so the output errs by about that rounding of the random-feature mass of the whole row relative to
    its normaliser (the window's random-feature mass is within a small factor of its exact mass); a column
    whose outside mass is below OUTSIDE_FLOOR of its total lies within that rounding and counts as empty.
    Causal, the outside is a running sum, which needs every key it holds: each segment is summed with its own
    maximum as shift and the running sums run in float64, shifted by the largest maximum per column (exact
    while the keys' log-features span less than float64's exponent range, about 700). ``inplace``: overwrite
    the intermediates (False when autograd records the call; the same numbers).
    """
    M, F, device = lk.shape[-2], lk.shape[-1], lk.device
    cuts, L, S = geometry.cuts, geometry.length, geometry.segments
    v1 = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1)  # (*b, M, 1 + dv): the mass with the values
    if (np.diff(cuts) == L).all():
        lk_s, v_s = lk.unflatten(-2, (S, L)), v1.unflatten(-2, (S, L))  # (R, *b, S, L, F), (*b, S, L, 1 + dv)
    else:
        key = torch.from_numpy(cuts[:-1]).to(device).unsqueeze(-1) + torch.arange(L, device=device)  # (S, L)
        outside = (key >= torch.from_numpy(cuts[1:]).to(device).unsqueeze(-1)).unsqueeze(-1)  # (S, L, 1)
        key = key.clamp_(max=M - 1)
        lk_s, v_s = lk[..., key, :].masked_fill(outside, -math.inf), v1[..., key, :]
    if geometry.causal:
        top = lk_s.amax(-2, keepdim=True)  # (R, *b, S, 1, F); finite: every segment holds a key
        peak = top.amax(-3, keepdim=True)
        sums = (v_s.transpose(-1, -2) @ (lk_s - top).exp()).double() * (top - peak).double().exp()
        outside = torch.cat([torch.zeros_like(sums[..., :1, :, :]), sums.cumsum(-3)], dim=-3)
        outside = outside[..., torch.from_numpy(geometry.prefix_end).to(device), :, :]  # (R, *b, B, 1 + dv, F)
        empty = outside[..., :1, :] == 0
    else:
        peak = lk.amax(-2, keepdim=True).unsqueeze(-2)  # (R, *b, 1, 1, F)
        weights = (lk_s - peak).exp_() if inplace else (lk_s - peak).exp()
        sums = v_s.transpose(-1, -2) @ weights  # (R, *b, S, 1 + dv, F): each segment's mass and sums
        total = sums.sum(-3, keepdim=True)
        own = [_take(sums, geometry.prefix_end + i, geometry.suffix_start, device)
               for i in range(int((geometry.suffix_start - geometry.prefix_end).max(initial=0)))]
        if inplace and own and own[0] is sums:  # the blocks are the segments: overwrite them
            outside = sums.neg_().add_(total)
            for segment in own[1:]:
                outside.sub_(segment)
        else:
            outside = total - sum(own[1:], own[0]) if own else total.expand(*sums.shape[:-3], 0, *sums.shape[-2:])
        empty = outside[..., :1, :] <= OUTSIDE_FLOOR[lk.dtype] * total[..., :1, :]
    mass = outside[..., :1, :].masked_fill(empty, 1.0)  # (R, *b, B, 1, F)
    log_mass = (mass.log() + peak).masked_fill(empty, -math.inf).squeeze(-2)
    if inplace:
        kv = outside[..., 1:, :].div_(mass).masked_fill_(empty, 0.0)
    else:
        kv = (outside[..., 1:, :] / mass).masked_fill(empty, 0.0)  # (R, *b, B, dv, F)
    return log_mass.to(lk.dtype), kv.transpose(-1, -2).to(lk.dtype)


def _take(sums: torch.Tensor, index: np.ndarray, stop: np.ndarray, device) -> torch.Tensor:
    """sums[..., index_j, :, :] where index_j < stop_j, zero elsewhere (index clipped to the segments): (..., B, *)."""
    S = sums.shape[-3]
    if len(index) == S and (index == np.arange(S)).all() and (index < stop).all():
        return sums
    keep = torch.from_numpy(index < stop).to(device).view(-1, 1, 1)
    return sums[..., torch.from_numpy(index.clip(max=S - 1)).to(device), :, :] * keep
