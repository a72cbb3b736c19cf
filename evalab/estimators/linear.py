"""Linear attention with a feature map (docs/theory.md sections 13 and "Feature maps and window hybrids"):
deterministic, and NOT an estimator of softmax attention. Its kernel phi(x).psi(y) is a different similarity from
exp(x.y), so the gap it leaves does not shrink with any budget; it is the baseline every random method must beat.

  Y_n = sum_m phi(x_n).psi(y_m) v_m / sum_m phi(x_n).psi(y_m)       (causal: m <= n)

on scaled coordinates x = sqrt(scale) q, y = sqrt(scale) k; phi = psi for the fixed maps of
evalab.estimators.feature_maps (elu + 1, relu, taylor, dpfp), separate for the learned ones (T2R, Hedgehog,
ReBased). relu, dpfp, t2r and rebased features can meet no key at all (phi(x_n).psi(y_m) = 0 for every m); their kernel is then
taken as phi(x).psi(y) + RELU_EPS (one constant feature column sqrt(RELU_EPS) on both sides), so such a query
attends uniformly over its keys instead of dividing 0 by 0.

Window hybrid (``window`` > 0): exact softmax terms on the local window W(n) = [lo_n, hi_n) of
evalab.estimators.window, feature terms elsewhere, in one normaliser,

  Y_n = [g sum_{W(n)} e^{x_n.y_m - c_n} v_m + a sum_{not W(n)} phi(x_n).psi(y_m) v_m]
        / [g sum_{W(n)} e^{x_n.y_m - c_n} + a sum_{not W(n)} phi(x_n).psi(y_m)]

with g = sigmoid(gamma) per head, a = 1 - g (``affine=True``, evalab's default) or 1 (LoLCATs' default,
affine_attention_factors=False), and c_n = 0 (``shift="none"``, evalab's: the exact terms are e^{x.y}
themselves, and g = 1/2 with affine gives the plain sum) or the largest logit in the window (``shift="row_max"``,
LoLCATs'). The keys outside the window are a prefix [0, lo_n) and (non-causal) a suffix [hi_n, M), summed over
blocks of queries with a carried state, so no N x M tensor is formed. The two sums are combined in log space
(the window's as its logsumexp), so float32 stays finite at any logit size. A window covering every key gives
softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from .. import _checks
from . import feature_maps
from .base import Cost
from .draw import Draw, NoDraws
from .rfa import CAUSAL_BLOCK, causal_feature_attention, feature_attention
from .scaled import Scaled
from .window import bounds, check_window, local_attention, pairs, query_block

FEATURES = ("elu", "relu", "taylor", "dpfp")
#: Maps that can give 0 for every key, and so get the constant guard column (see the module docstring).
VANISHING = ("relu", "dpfp", "t2r")
#: The constant added to the kernel of maps that can vanish (see the module docstring).
RELU_EPS = 1e-6
#: The constant c_n of the window hybrid (module docstring): "none" (c_n = 0), "row_max" (LoLCATs).
SHIFTS = ("none", "row_max")


def linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """sum_m qf_n.kf_m v_m / sum_m qf_n.kf_m for features qf (*b, N, F), kf (*b, M, F), v (*b, M, dv)
    (causal: m <= n, over blocks of CAUSAL_BLOCK positions): (*b, N, dv)."""
    if causal:
        return causal_feature_attention(qf, kf, v)
    return feature_attention(qf.unsqueeze(-2), kf.unsqueeze(-2), v)[0]


def with_guard(features: torch.Tensor) -> torch.Tensor:
    """Features (*b, L, F) with the constant column sqrt(RELU_EPS) appended: (*b, L, F + 1)."""
    return torch.cat([features, torch.full_like(features[..., :1], math.sqrt(RELU_EPS))], dim=-1)


def prefix_sums(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, lo: np.ndarray, block: int) -> torch.Tensor:
    """sum_{m < lo_n} qf_n.kf_m v_m for every query, lo non-decreasing: (*b, N, dv), over blocks of ``block``
    queries with a carried (F, dv) state of the keys before the block's first bound and the pairs from there to
    each query's own bound. Differentiable (no in-place operation)."""
    N = qf.shape[-2]
    state, end, out = None, 0, []  # the state holds keys [0, end)
    for t0 in range(0, N, block):
        t1 = min(N, t0 + block)
        a, b = int(lo[t0]), int(lo[t1 - 1])
        if a > end:
            update = kf[..., end:a, :].transpose(-1, -2) @ v[..., end:a, :]
            state, end = update if state is None else state + update, a
        q_b = qf[..., t0:t1, :]
        part = q_b @ state if state is not None else torch.zeros(
            *torch.broadcast_shapes(q_b.shape[:-2], v.shape[:-2]), t1 - t0, v.shape[-1], dtype=v.dtype, device=v.device)
        if b > a:
            before = torch.arange(a, b, device=v.device) < torch.from_numpy(lo[t0:t1]).to(v.device).unsqueeze(-1)
            part = part + ((q_b @ kf[..., a:b, :].transpose(-1, -2)) * before) @ v[..., a:b, :]
        out.append(part)
    return torch.cat(out, dim=-2)


def prefix_sums_flops(lo: np.ndarray, block: int, F: int, dv: int) -> tuple[float, float]:
    """(matrix-product FLOPs, elementwise FLOPs) of :func:`prefix_sums` with F features and dv value columns:
    per block of T queries whose bounds span p keys, the state's contribution (2 T F dv, once the state holds
    keys) and the pairs (2 T p (F + dv)); the state update (2 F dv per key taken in). Elementwise: the mask
    (T p), adding the pairs' part (T dv) and each state update after the first (F dv)."""
    N, matmul, elementwise, updates = len(lo), 0.0, 0.0, 0
    end = 0
    for t0 in range(0, N, block):
        t1 = min(N, t0 + block)
        T, a, p = t1 - t0, int(lo[t0]), int(lo[t1 - 1] - lo[t0])
        if a > end:
            updates, end = updates + 1, a
        matmul += (2 * T * F * dv if end > 0 else 0) + 2 * T * p * (F + dv)
        elementwise += T * p + (T * dv if p > 0 else 0)
    return matmul + 2 * end * F * dv, elementwise + max(0, updates - 1) * F * dv


class FeatureAttention(NoDraws):
    """Attention through feature maps, Y_n = sum_m phi(x_n).psi(y_m) v_m / sum_m phi(x_n).psi(y_m), with an
    optional exact window (the window hybrid of the module docstring); deterministic. A subclass is a frozen
    dataclass with fields causal, scale, window, window_kind, gamma, shift, affine and defines
    ``feature_pair(x, y)`` -> (phi(x) (*b, N, F), psi(y) (*b, M, F)), ``columns(d)`` -> F and
    ``map_flops(N, M, d)`` -> (matrix-product FLOPs, elementwise FLOPs) of the two maps.

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    def _check_window_fields(self) -> None:
        _checks.boolean("causal", self.causal)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        check_window(self.window, self.window_kind, kind_name="window_kind")
        _checks.choice("shift", self.shift, SHIFTS)
        _checks.boolean("affine", self.affine)
        if not isinstance(self.gamma, torch.Tensor):
            _checks.real("gamma", self.gamma, minimum=-math.inf)

    def exact_limit(self, N: int, M: int):
        """Exact for N = M: an exact window holding every key (evalab.testing)."""
        return replace(self, window=2 * M) if N == M else None

    def bounds(self, N: int, M: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact window of every query, keys [lo_n, hi_n): (N,) each (evalab.estimators.window)."""
        return bounds(self.window, self.window_kind, N, M, causal=self.causal)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        draw.for_estimator(self, q, k, inp.x)  # refuses another estimator's draw
        qf, kf = self.feature_pair(inp.x, inp.y)
        if self.window == 0:
            out = linear_attention(qf, kf, inp.v, causal=self.causal)
        else:
            out = self._hybrid(inp, qf, kf)
        if tuple(out.shape[:-2]) != tuple(q.shape[:-2]):
            raise ValueError(f"the parameters' leading axes broadcast q's batch axes {tuple(q.shape[:-2])} to "
                             f"{tuple(out.shape[:-2])}; expected them to broadcast against (*b) without enlarging it")
        return out.to(inp.out_dtype).expand(draw.replicates, *out.shape)

    def _hybrid(self, inp: Scaled, qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
        """Exact window + features outside it, one normaliser (module docstring)."""
        N, M, dv = inp.x.shape[-2], inp.y.shape[-2], inp.v.shape[-1]
        lo, hi = self.bounds(N, M)
        block = query_block(self.window, self.window_kind)
        lse, inside, top = local_attention(inp.x, inp.y, inp.v, lo, hi, block, with_max=True)
        v1 = torch.cat([inp.v, torch.ones_like(inp.v[..., :1])], dim=-1)  # the last column sums the kernel
        outside = prefix_sums(qf, kf, v1, lo, block)
        if not self.causal:  # the suffix [hi_n, M) is a prefix of the reversed keys, for the reversed queries
            outside = outside + prefix_sums(qf.flip(-2), kf.flip(-2), v1.flip(-2), (M - hi)[::-1].copy(), block).flip(-2)
        gamma = torch.as_tensor(self.gamma, dtype=inp.x.dtype, device=inp.x.device).unsqueeze(-1)  # (*heads, 1)
        log_mass = torch.nn.functional.logsigmoid(gamma) + (lse - top if self.shift == "row_max" else lse)  # (*b, N)
        rest = outside * torch.sigmoid(-gamma).unsqueeze(-1) if self.affine else outside  # 1 - g = sigmoid(-gamma)
        # both sums divided by e^c, c the larger log-mass (it cancels): finite in float32 at any logit size
        c = torch.maximum(log_mass, torch.log(rest[..., dv])).detach()
        mass, rest = torch.exp(log_mass - c), rest * torch.exp(-c).unsqueeze(-1)
        return (mass.unsqueeze(-1) * inside + rest[..., :dv]) / (mass + rest[..., dv]).unsqueeze(-1)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """All deterministic, with F = columns(d) feature columns; the maps' own FLOPs from map_flops.
        Without a window, matrix products as performed: non-causal, sum_m psi(y_m) v_m^T (2 M F dv), the
        numerators (2 N F dv) and denominators (2 N F); causal, per block of t <= CAUSAL_BLOCK positions, the
        within-block kernel (2 t^2 F), its product with v (2 t^2 dv), the carried state's contribution (2 t F dv)
        and the state update (2 t F dv). Elementwise terms added: the key sum (M F) and the division (N dv);
        causal, the mass update and query-mass product (3 t F) and the within-block row sums (t^2) per block.
        With a window: LocalWindow's count for the window (2 P (d + dv) + 4 P over P padded pairs) and, for the
        prefix (and, non-causal, the suffix) of keys outside it, prefix_sums_flops with dv + 1 value columns
        (the last one sums the kernel), plus 6 N dv to combine. Memory: the features, the state, the window's
        logits and the output."""
        Fc = self.columns(d)
        map_matmul, map_elementwise = self.map_flops(N, M, d)
        flops = map_matmul + map_elementwise + N * dv
        memory = (N + M) * Fc + Fc * dv + N * dv
        if self.window:
            lo, hi = self.bounds(N, M)
            block = query_block(self.window, self.window_kind)
            P = pairs(lo, hi, block)
            flops += 2 * P * (d + dv) + 4 * P + 5 * N * dv
            for bound in [lo] if self.causal else [lo, (M - hi)[::-1]]:
                flops += sum(prefix_sums_flops(bound, block, Fc, dv + 1))
            memory += 2 * P + block * block * Fc
        elif not self.causal:
            flops += 2 * M * Fc * dv + 2 * N * Fc * dv + 2 * N * Fc + M * Fc
        else:
            for t in [CAUSAL_BLOCK] * (N // CAUSAL_BLOCK) + ([N % CAUSAL_BLOCK] if N % CAUSAL_BLOCK else []):
                flops += 2 * t * t * (Fc + dv) + 4 * t * Fc * dv + 3 * t * Fc + t * t
            memory += min(CAUSAL_BLOCK, N) ** 2
        return Cost.per_element(flops, 0.0, memory, 0.0, batch=batch, itemsize=itemsize)


@dataclass(frozen=True)
class LinearAttention(FeatureAttention):
    """Linear attention with the fixed ``feature`` map elu (elu(x) + 1) | relu | taylor | dpfp (with ``nu``), and
    an exact ``window`` (0: none) of ``window_kind`` block | sliding: the window hybrid of the module docstring,
    mixing weight g = sigmoid(gamma) (a float, or a tensor (*heads) per head), c_n by ``shift``, the feature terms
    weighted 1 - g (``affine``) or 1.

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    feature: str = "elu"
    causal: bool = False
    scale: float | None = None
    nu: int = 4
    window: int = 0
    window_kind: str = "sliding"
    gamma: float | torch.Tensor = 0.0
    shift: str = "none"
    affine: bool = True

    learnable_fields: ClassVar[tuple[str, ...]] = ("gamma",)

    def __post_init__(self) -> None:
        _checks.choice("feature", self.feature, FEATURES)
        _checks.integer("nu", self.nu)
        self._check_window_fields()

    @classmethod
    def _check_instances(cls) -> list:
        plain = [cls(feature=f, causal=c) for f in FEATURES for c in (False, True)]
        return plain + [cls(feature="taylor", window=8, window_kind=kind, causal=c, shift=shift)
                        for kind, shift in (("block", "none"), ("sliding", "row_max")) for c in (False, True)]

    def columns(self, d: int) -> int:
        """Feature columns F: d (elu), d + 1 (relu), 1 + d + d (d + 1) / 2 (taylor), 2 d nu + 1 (dpfp); the + 1 is
        the guard column of maps that can vanish."""
        columns = {"elu": d, "relu": d + 1, "taylor": feature_maps.taylor_columns(d), "dpfp": 2 * d * self.nu + 1}
        return columns[self.feature]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) for scaled x (*b, L, d): (*b, L, columns(d)), the guard column included."""
        if self.feature == "dpfp":
            return with_guard(feature_maps.dpfp(x, self.nu))
        phi = getattr(feature_maps, self.feature)(x)
        return with_guard(phi) if self.feature in VANISHING else phi

    def feature_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(x), self.features(y)

    def map_flops(self, N: int, M: int, d: int) -> tuple[float, float]:
        """No matrix product; 3 elementwise per feature (elu: elu, + 1, copy; relu: relu, copy, guard; taylor:
        product, gather, concatenate; dpfp: relu, roll, product) on N + M rows."""
        return 0.0, 3 * (N + M) * self.columns(d)
