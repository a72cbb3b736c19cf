"""Scatterbrain: exact attention on a local support, random features everywhere else, one normaliser
(docs/theory.md section 12).

  Y_n = [ sum_{m in E_n} e^{l_nm} v_m + sum_{m not in E_n} phi(x_n).phi(y_m) v_m ]
        / [ sum_{m in E_n} e^{l_nm} + sum_{m not in E_n} phi(x_n).phi(y_m) ]

The support E_n is the window of keys [lo_n, hi_n) of evalab.estimators.window: support "block", EVA's
block-local windows (the block of ``window`` positions holding n, as in the EVA authors' re-implementation);
"sliding", the keys m with m - n in [-floor(w/2), ceil(w/2)) (the Scatterbrain authors' SBLocalAttention), causal
the w keys ending at n. Causal: keys m <= n only, the random features over the past keys before the support.
window = 0 gives RFA, a support holding every key gives softmax.

The keys fall into tiles of one query block's length; per tile and feature column f the keys' mass
sum_m phi_f(y_m) and value sum sum_m phi_f(y_m) v_m form a state, and a block of queries takes the total less the
few tiles that hold its supports (causal: a running sum over the earlier tiles). Each query then takes one
softmax over its window's logits, its block's state columns log phi_f(x_n) + log mass_f and the log-kernels of
the keys of those tiles outside its own support (its "pairs"; none for the block support), applied to the
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

#: On CPU, logits (replicates x batch x queries x (window + feature columns + pairs)) per group of query blocks.
MIX_ELEMENTS = 2**20
#: Per compute dtype, the fraction of a column's total below which its mass outside a block's support is rounding
#: of the subtraction that computes it (64 units of rounding), and counts as no mass.
OUTSIDE_FLOOR = {dtype: 64 * torch.finfo(dtype).eps
                 for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


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
        log_mass, kv = _states(lk, inp.v, geometry, -(-N // block), inplace=inp.inplace)
        out = _mix(inp, omega, self.feature_map, lk, lo, hi, block, geometry, log_mass, kv)
        return out.to(inp.out_dtype)

    def query_block(self) -> int:
        """Queries per block of the support, keys per tile of the states: evalab.estimators.window.query_block."""
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
        2 (N + M) F elementwise to negate and subtract); the tile sums of the keys with
        their masses (:class:`Complement`: C tiles of L = T keys, 2 C L F (dv + 1)); the
        support's weights @ v (2 P dv), and per block (B blocks of T queries) the state's (2 B T F dv), its p
        pair keys' kernels (2 B T p F) and weights @ v (2 B T p dv). Elementwise terms added: 4 per support pair
        (mask, subtract, exp, sum), 3 per tile key-feature (subtract, exp), 6 per tile state entry and 4 per
        block state entry for the outside sums (C F dv, B F dv), 3 per query- and pair-key-feature of a block
        for the pair kernels (B (T + p) F) and 2 per pair (floor, log; B T p), and 4 per query-column
        (B T (F + p)). Memory: the support's logits and gathered keys, the log-features, the tiles' weights,
        the tile and block states, one group's logits, pairs and weights, the output."""
        F = self.columns
        lo, hi = self.bounds(N, M)
        block = self.query_block()
        first, width = span(lo, hi, block)
        pairs = len(first) * block * width * bool(self.window)  # support logits over padded blocks of queries
        S = self.num_features
        rep = 2 * (N + M) * S * (d + 1) if self.feature_map == "positive" else 2 * (N + M) * (S * d + F)
        geometry = Complement.of(lo, hi, block, M, self.causal)
        B, C, L, p = -(-N // block), geometry.tiles, block, geometry.reach
        rep += 2 * C * L * F * (dv + 1) + 2 * pairs * dv + 2 * B * block * (F + p) * dv + 2 * B * block * p * F
        rep += (4 * pairs + 3 * C * L * F + 6 * C * F * dv + 4 * B * F * dv + 3 * B * (block + p) * F * (p > 0)
                + 2 * B * block * p + 4 * B * block * (F + p))
        group = min(B * block * (width + F + p), MIX_ELEMENTS)
        running = 8 // itemsize if self.causal else 1  # causal tile sums in float64
        memory = (2 * (N + M) * F + N * dv + 2 * C * L * F + 2 * C * F * (dv + 1) * running
                  + B * F * (dv + 1) + 3 * group + B * (block + p) * F * (p > 0))
        memory_fixed = pairs + len(first) * width * (d + dv) * bool(self.window)
        return Cost.per_element(2 * pairs * d, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)


@dataclass(frozen=True)
class Complement:
    """Which keys each block of ``block`` queries leaves to its pairs (numpy, no tensor).

    The keys fall into ``tiles`` of ``block`` keys (the last one padded). Block j leaves out the tiles
    j + first .. j + last - 1 (causal: every tile from j + first on), a range that holds the support of each of
    its queries (none for empty non-causal supports); its state sums the other tiles. The keys it leaves out
    that lie outside a query's own support, [start_j, lo_n) and [hi_n, end_j), are that query's pairs: at most
    ``before`` and ``after`` per query.
    """

    block: int
    first: int
    last: int  # exclusive; causal: unused (every later tile is left out)
    tiles: int
    before: int
    after: int
    causal: bool

    @classmethod
    def of(cls, lo: np.ndarray, hi: np.ndarray, block: int, M: int, causal: bool) -> "Complement":
        N, T = len(lo), block
        j = np.arange(N) // T  # each query's block
        tiles = -(-M // T)
        if not causal and (lo == hi).all():  # empty supports: every key in the state, no pairs
            return cls(T, 0, 0, tiles, 0, 0, causal)
        first = int((lo // T - j).min())
        last = int((-(-hi // T) - j).max())
        before = int((lo - T * (j + first)).max(initial=0))
        after = 0 if causal else int((T * (j + last) - hi).max(initial=0))
        return cls(T, first, last, tiles, before, after, causal)

    @property
    def reach(self) -> int:
        """Pair keys per query: before + after."""
        return self.before + self.after

    def pairs(self, lo: np.ndarray, hi: np.ndarray, M: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair keys of every block, (B, reach) (start_j + i for i < before, then end_j - after + i for
        i < after, clipped to [0, M)), and which are pairs of which query, (B, block, reach) bool (padding
        rows: none)."""
        N, T = len(lo), self.block
        B = -(-N // T)
        start = T * (np.arange(B) + self.first)
        end = start + T * (self.last - self.first)
        offsets = np.concatenate([start[:, None] + np.arange(self.before),
                                  end[:, None] - self.after + np.arange(self.after)], axis=1)
        lo_p, hi_p = (np.pad(t, (0, B * T - N)).reshape(B, T, 1) for t in (lo, hi))
        keys = offsets[:, None, :]
        pair = np.concatenate([(keys[..., :self.before] >= 0) & (keys[..., :self.before] < lo_p),
                               (keys[..., self.before:] >= hi_p) & (keys[..., self.before:] < M)], axis=-1)
        pair[N // T:, (N % T or T):] = False  # padding rows
        return offsets.clip(0, M - 1), pair


def _mix(inp: Scaled, omega: torch.Tensor, feature_map: str, lk: torch.Tensor, lo: np.ndarray, hi: np.ndarray,
         block: int, geometry: Complement, log_mass: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The output (R, *b, N, dv): per query one softmax over its window's logits x_n.y_m, its block's state
    columns log phi_f(x_n) + log_mass_f (``_states``) and its pairs' log-kernels log phi(x_n).phi(y_m)
    (``_pair_logits``), applied to the window's values, the state averages kv_f and the pairs' values.

    Over groups of blocks of ``block`` queries (on CPU at most MIX_ELEMENTS logits per group, so each group's
    temporaries stay in cache), the queries' log-features made per group. lk (R, *b, M, F) from
    :func:`_log_features`; log_mass (R, *b, B, F), kv (R, *b, B, F, dv)."""
    x, v, inplace = inp.x, inp.v, inp.inplace
    N, F, device = x.shape[-2], lk.shape[-1], x.device
    xb, keys, values, inside = window_blocks(x, inp.y, v, lo, hi, block)  # (*b, B, T, d), (*b, B, w, .)
    B, reach = xb.shape[-3], geometry.reach
    width = keys.shape[-2] if (lo < hi).any() else 0  # window 0: no support, random features only
    if reach:
        offsets, pair = geometry.pairs(lo, hi, lk.shape[-2])
        key, beyond = torch.from_numpy(offsets).to(device), torch.from_numpy(~pair).to(device)  # (B, p), (B, T, p)
    rows = math.prod(lk.shape[:-2]) * block  # logits rows per block
    groups = B if device.type != "cpu" else max(1, MIX_ELEMENTS // (rows * (width + F + reach)))
    state = log_mass - math.log(F)  # the 1/F of phi(x).phi(y), which _log_features leaves out
    out = torch.empty(*lk.shape[:-2], B, block, v.shape[-1], dtype=v.dtype, device=device)
    for j0 in range(0, B, groups):
        j1 = min(B, j0 + groups)
        xb_g = xb[..., j0:j1, :, :]
        parts = []
        if width:
            local = xb_g @ keys[..., j0:j1, :, :].transpose(-1, -2)  # (*b, G, T, w)
            if lk.shape[0] == 1:  # one replicate: the replicate axis of the other parts
                local = local.unsqueeze(0)
            if inside is not None:
                local = local.masked_fill(~inside[j0:j1], -math.inf)
            parts.append((local, values[..., j0:j1, :, :]))
        lq = _log_features(xb_g.flatten(-3, -2), omega, feature_map).unflatten(-2, xb_g.shape[-3:-1])  # (R,*b,G,T,F)
        if reach:  # before the state joins lq in place
            keys_p = key[j0:j1]
            pair = _pair_logits(lq, lk[..., keys_p, :]).masked_fill(beyond[j0:j1], -math.inf)
            parts.append((pair, v[..., keys_p, :]))
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


def _pair_logits(lq: torch.Tensor, lk: torch.Tensor) -> torch.Tensor:
    """log phi(x_n).phi(y_m) for the queries lq (R, *b, G, T, F) and pair keys lk (R, *b, G, p, F) of each block
    (both from :func:`_log_features`): (R, *b, G, T, p), one matrix product per block. The keys are shifted by
    their block's largest log-feature per column, each query by its largest shifted one, so every term is at most
    1 and the largest kernel of a block's keys survives; a term below the dtype's range, at least e^-87 (float32)
    under the query's largest, is dropped, and a kernel that loses all its terms is floored at the dtype's
    smallest normal number (a finite logit, its weight negligible)."""
    top = lk.amax(-2, keepdim=True)  # (R, *b, G, 1, F)
    shifted = lq + top
    row = shifted.amax(-1, keepdim=True)  # (R, *b, G, T, 1)
    kernel = (shifted - row).exp() @ (lk - top).exp().transpose(-1, -2)
    return kernel.clamp_min(torch.finfo(kernel.dtype).tiny).log() + (row - math.log(lq.shape[-1]))


def _log_features(x: torch.Tensor, omega: torch.Tensor, feature_map: str) -> torch.Tensor:
    """log phi(x) + log(F) / 2 (the constant left to the callers): x (*b, N, d) -> (R, *b, N, F), a view of one
    (*b, N, R, F) projection."""
    return stacked_projection(x, omega, feature_map, minus_half_norm=True).movedim(-2, 0)


def _states(lk: torch.Tensor, v: torch.Tensor, geometry: Complement, blocks: int, *,
            inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block j of queries (``blocks`` of them) and column f, over the keys of every tile it does not leave
    out (:class:`Complement`): log_mass log sum_m e^{lk_mf} (R, *b, B, F) and kv, the matching average of v
    (R, *b, B, F, dv); -inf and 0 for no key. The tiles are views of the keys (padded when the tile size does
    not divide M).

    Non-causal, a block's state is the total less the tiles it leaves out, in the compute dtype, every key shifted
    by its column's largest log-feature: the subtraction errs by the dtype's rounding of the column's total, so
    the output errs by about that rounding of the random-feature mass of the whole row relative to its
    normaliser (the window's random-feature mass is within a small factor of its exact mass); a column whose
    outside mass is below OUTSIDE_FLOOR of its total lies within that rounding and counts as empty. Causal, the
    state is a running sum over the earlier tiles, which needs every key it holds: each tile is summed with its
    own maximum as shift and the running sums run in float64, shifted by the largest maximum per column (exact
    while the keys' log-features span less than float64's exponent range, about 700). ``inplace``: overwrite
    the intermediates (False when autograd records the call; the same numbers).
    """
    T, S, device = geometry.block, geometry.tiles, lk.device
    v1 = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1)  # (*b, M, 1 + dv): the mass with the values
    pad = S * T - lk.shape[-2]
    if pad:  # padding keys: log-feature -inf, value 0
        lk = torch.nn.functional.pad(lk, (0, 0, 0, pad), value=-math.inf)
        v1 = torch.nn.functional.pad(v1, (0, 0, 0, pad))
    lk_s = lk.unflatten(-2, (S, T))  # (R, *b, S, T, F)
    v_s = v1.unflatten(-2, (S, T)).transpose(-1, -2)  # (*b, S, 1 + dv, T)
    first, last = geometry.first, geometry.last
    if geometry.causal:
        top = lk_s.amax(-2, keepdim=True)  # (R, *b, S, 1, F); finite: every tile holds a key
        peak = top.amax(-3, keepdim=True)
        sums = (v_s @ (lk_s - top).exp()).double() * (top - peak).double().exp()  # (R, *b, S, 1 + dv, F)
        running = torch.cat([torch.zeros_like(sums[..., :1, :, :]), sums.cumsum(-3)], dim=-3)
        index = torch.from_numpy((np.arange(blocks) + first).clip(0, S)).to(device)
        outside = running[..., index, :, :]  # (R, *b, B, 1 + dv, F)
        empty = outside[..., :1, :] == 0
    else:
        peak = lk.amax(-2, keepdim=True).unsqueeze(-2)  # (R, *b, 1, 1, F)
        weights = (lk_s - peak).exp_() if inplace else (lk_s - peak).exp()
        sums = v_s @ weights  # (R, *b, S, 1 + dv, F): each tile's mass and value sums
        total = sums.sum(-3, keepdim=True)
        # tile j + k of block j, k in [first, last), as slices of the tiles padded with zero tiles
        left, right = max(0, -first), max(0, blocks - 1 + last - S)
        padded = torch.nn.functional.pad(sums, (0, 0, 0, 0, left, right)) if left or right else sums
        own = [padded[..., left + k:left + k + blocks, :, :] for k in range(first, last)]
        if inplace and own and own[0] is sums and len(own) == 1:  # the blocks leave out their own tile: overwrite
            outside = sums.neg_().add_(total)
        elif own:
            outside = total - own[0]
            for tile in own[1:]:
                outside = outside.sub_(tile) if inplace else outside - tile
        else:
            outside = total.expand(*sums.shape[:-3], blocks, *sums.shape[-2:])
        empty = outside[..., :1, :] <= OUTSIDE_FLOOR[lk.dtype] * total[..., :1, :]
    mass = outside[..., :1, :].masked_fill(empty, 1.0)  # (R, *b, B, 1, F)
    log_mass = (mass.log() + peak).masked_fill(empty, -math.inf).squeeze(-2)
    if inplace and outside.is_contiguous() and outside.dtype == lk.dtype:
        kv = outside[..., 1:, :].div_(mass).masked_fill_(empty, 0.0)
    else:
        kv = (outside[..., 1:, :] / mass).masked_fill(empty, 0.0)  # (R, *b, B, dv, F)
    return log_mass.to(lk.dtype), kv.transpose(-1, -2).to(lk.dtype)
