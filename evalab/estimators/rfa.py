"""Random-feature attention (RFA / Performer): the self-normalised importance sampler of softmax attention.

  RFA_n = sum_f phi_f(x_n) sum_m phi_f(y_m) v_m / sum_f phi_f(x_n) sum_m phi_f(y_m)      (docs/theory.md section 3)

Positive-type maps (positive, hyperbolic and the generalised exponential maps oprf, sderf, saderf) are
evaluated in log space as a softmax over feature columns of the per-column key averages, so float32 stays finite
at large norms; ``trig`` features and ``eps > 0`` use stabilised features in
the linear domain. Causal prefix sums run over blocks of positions with a carried state of size F x dv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks
from .base import Cost
from .draw import Draw
from .features import (FEATURE_MAPS, OmegaDraws, folded_projection, gerf_log_features, log_features,
                       num_columns, stacked_projection, trig_features)
from .gerf import GERF_MAPS, GerfMap, parameter_flops
from .scaled import Scaled

#: Positions per block of the causal prefix sums (memory R x block x block x F per step).
CAUSAL_BLOCK = 32
#: Log-features per block of positions in non-causal RFA on CPU (float32: 4 MiB, cache-sized).
LOG_BLOCK_ELEMENTS = 2**20


@dataclass(frozen=True)
class RFA(OmegaDraws):
    """Random-feature attention with S = ``num_features`` omega draws.

    feature_map: positive | hyperbolic | trig | oprf | sderf | saderf; sampler: iid | orthogonal | qmc.
    eps: constant added to the stabilised features, as Performer does (see ``_linear_features``); 0 gives the
    exact estimator.
    shared_noise: one set of draws for every batch element and head (Performer's one projection matrix), noise
    (R, S, d); False gives each batch element its own, noise (R, *b, S, d), as independent heads would have.
    gerf_a: oprf/sderf/saderf only: fixes A = gerf_a I (< 1/8) instead of the optimum (None), e.g. to trace the
    variance against A; for sderf an isotropic A makes it oprf, for saderf the rescaling Psi stays optimal.
    The generalised exponential maps (docs/theory.md sections 8, 9) set A per batch element from the pooled
    statistics of the call's scaled queries and keys. Causal attention takes them from the whole sequence, as the
    reference code does: a query's features then depend on statistics of later positions (through A only; each
    output still mixes only its past keys and values).
    Call: est(q, k, v, draw) with q (*b, N, d), k (*b, M, d), v (*b, M, dv) -> (R, *b, N, dv).
    """

    num_features: int = 64
    feature_map: str = "positive"
    sampler: str = "iid"
    causal: bool = False
    eps: float = 0.0
    scale: float | None = None
    shared_noise: bool = True
    gerf_a: float | None = None
    budget = "num_features"  # the parameter along which the error falls (evalab.testing)

    def __post_init__(self) -> None:
        self._check_omega_fields(FEATURE_MAPS)
        _checks.real("eps", self.eps)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        if self.eps > 0 and self.feature_map not in ("positive", "hyperbolic"):
            raise ValueError(f"eps > 0 applies to positive-type features without parameters (positive, hyperbolic) only, "
                             f"got feature_map={self.feature_map!r}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        omega = draw.for_estimator(self, q, k, inp.x)
        if self.feature_map in GERF_MAPS:
            gmap = GerfMap.of(self.feature_map, inp.x, inp.y, self.gerf_a)
            if self.causal:
                out = _causal_log(*gerf_log_features(gmap, omega), inp.v)
            else:
                out = _log(gmap.x, gmap.y, inp.v, omega, "positive", gerf=gmap, inplace=inp.inplace)
        elif self.feature_map == "trig" or self.eps > 0:
            qf, kf = self._linear_features(inp, omega)
            out = causal_feature_attention(qf.movedim(-2, 0), kf.movedim(-2, 0), inp.v) if self.causal else feature_attention(qf, kf, inp.v)
        elif self.causal:
            out = _causal_log(log_features(inp.x, omega, self.feature_map), log_features(inp.y, omega, self.feature_map), inp.v)
        else:
            out = _log(inp.x, inp.y, inp.v, omega, self.feature_map, inplace=inp.inplace)
        return out.to(inp.out_dtype)

    @property
    def columns(self) -> int:
        """Number of feature columns F."""
        return num_columns(self.feature_map, self.num_features)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """All per replicate. Matrix products as performed: projections w.x, one per draw whatever the map
        (2 (N+M) S d; positive log-space features fold -|x|^2/2 into the key GEMM, causal into both: + 2 S per
        row), key averages and query mixture (2 (N+M) F dv); causal adds the within-block mixture (2 N T dv).
        Elementwise: features and softmax (4 (N+M) F), causal within-block pair kernels (3 N T F).
        oprf/sderf/saderf fold like positive and add their parameters (gerf.parameter_flops: per call O((N+M) d),
        SDERF O((N+M) d^2 + d^3); per replicate 2 S d, SDERF + 2 S d^2)."""
        S, F = self.num_features, self.columns
        positive_type = self.feature_map in ("positive", *GERF_MAPS) and self.eps == 0
        folded = (N + M if self.causal else M) if positive_type else 0
        flops = 2 * (N + M) * S * d + 2 * folded * S + 2 * (N + M) * F * dv + 4 * (N + M) * F
        fixed = 0.0
        if self.feature_map in GERF_MAPS:
            fixed, per_draw = parameter_flops(self.feature_map, N=N, M=M, d=d)
            flops += per_draw * S
        if self.causal:
            T = min(CAUSAL_BLOCK, N)
            flops += N * T * (3 * F + 2 * dv)
            memory = 3 * (N + M) * F + T * T * F + 2 * F * dv + N * dv
        else:
            memory = 3 * (N + M) * F + F * dv + N * dv
        return Cost.per_element(fixed, flops, 0.0, memory, batch=batch, itemsize=itemsize)

    def _linear_features(self, inp: Scaled, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stabilised features in the linear domain, (*b, N, R, F) and (*b, M, R, F); factors that cancel in the
        ratio are dropped.

        Positive-type with eps (Performer's convention): phi = exp(w.x - |x|^2/2 - max w.x) + eps, the max taken
        per query row and, for keys, over all keys and features (per key when causal, so no key sees the future).
        """
        half_x = 0.5 * (inp.x * inp.x).sum(-1, keepdim=True)
        half_y = 0.5 * (inp.y * inp.y).sum(-1, keepdim=True)
        if self.feature_map == "trig":
            qf = trig_features(inp.x, omega, torch.zeros_like(half_x))
            kf = trig_features(inp.y, omega, half_y - half_y.amax(-2, keepdim=True))
            return qf.movedim(0, -2), kf.movedim(0, -2)
        pq = stacked_projection(inp.x, omega, self.feature_map, minus_half_norm=False)  # (*b, N, R, F)
        pk = stacked_projection(inp.y, omega, self.feature_map, minus_half_norm=False)
        key_max = pk.amax(-1, keepdim=True) if self.causal else pk.amax((-3, -1), keepdim=True)
        query_shift, key_shift = pq.amax(-1, keepdim=True) + half_x.unsqueeze(-1), key_max + half_y.unsqueeze(-1)
        if inp.inplace:
            return pq.sub_(query_shift).exp_().add_(self.eps), pk.sub_(key_shift).exp_().add_(self.eps)
        return (pq - query_shift).exp() + self.eps, (pk - key_shift).exp() + self.eps


def _log(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, omega: torch.Tensor, feature_map: str,
         gerf: GerfMap | None = None, *, inplace: bool = True) -> torch.Tensor:
    """Non-causal RFA in log space: out_n = softmax_f(log phi_f(x_n) + log sum_m phi_f(y_m)) @ kv_f, where kv_f is
    the phi_f(y)-weighted average of v. Works in the (*b, N, R, F) layout so every pass is contiguous; on CPU over
    blocks of at most LOG_BLOCK_ELEMENTS log-features (keys with a running per-column maximum), so long sequences
    stay in cache. ``gerf``: a generalised exponential map, whose transformed inputs x, y are passed with
    feature_map "positive"; its key row terms are folded into the key GEMM, and its per-column term (the same for
    queries and keys) joins the column shift twice. Query row terms cancel in the softmax over f.
    ``inplace``: overwrite the intermediates (False when autograd records the call; the same numbers)."""
    R, F = omega.shape[0], num_columns(feature_map, omega.shape[-2])
    per_row = math.prod(x.shape[:-2]) * R * F
    rows = max(1, LOG_BLOCK_ELEMENTS // per_row) if x.device.type == "cpu" else max(x.shape[-2], y.shape[-2])
    top = mass = kv = None  # per column (*b, 1, R, F): running max of log phi(y), sum of exp(. - top); kv unnormalised
    for start in range(0, y.shape[-2], rows):
        if gerf is None:
            lk = stacked_projection(y[..., start : start + rows, :], omega, feature_map, minus_half_norm=True)
        else:
            lk = folded_projection(y[..., start : start + rows, :], gerf.row_y[..., start : start + rows, :], omega)
        block_top = lk.amax(-3, keepdim=True)
        if top is None:
            top = block_top
        else:  # a higher maximum rescales what was summed so far
            new_top = torch.maximum(top, block_top)
            rescale = (top - new_top).exp_()
            if inplace:
                mass.mul_(rescale)
                kv.mul_(rescale.squeeze(-3).unsqueeze(-1))
            else:
                mass, kv = mass * rescale, kv * rescale.squeeze(-3).unsqueeze(-1)
            top = new_top
        weights = lk.sub_(top).exp_() if inplace else (lk - top).exp()
        block_mass = weights.sum(-3, keepdim=True)
        block_kv = torch.einsum("...mrf,...mv->...rfv", weights, v[..., start : start + rows, :])
        if mass is None:
            mass, kv = block_mass, block_kv
        elif inplace:
            mass.add_(block_mass)
            kv.add_(block_kv)
        else:
            mass, kv = mass + block_mass, kv + block_kv
    kv = kv / mass.squeeze(-3).unsqueeze(-1)
    shift = top + mass.log()
    if gerf is not None:
        shift = shift + 2.0 * gerf.column(omega).movedim(0, -2).unsqueeze(-3)  # (*b, 1, R, S)
    out = torch.empty(R, *x.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, x.shape[-2], rows):
        lq = stacked_projection(x[..., start : start + rows, :], omega, feature_map, minus_half_norm=False)
        if inplace:  # (*b, rows, R, F): the softmax over f without extra copies
            logits = lq.add_(shift)
            mix = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        else:
            logits = lq + shift
            mix = (logits - logits.amax(-1, keepdim=True)).exp()
        block = torch.einsum("...nrf,...rfv->...nrv", mix, kv) / mix.sum(-1, keepdim=True)
        out[..., start : start + rows, :] = block.movedim(-2, 0)
    return out


def _causal_log(lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal RFA in log space, over blocks of positions.

    Carried state per column f: log_mass_f = log sum_{m<block} e^{lk_mf} and kv_f, the matching average of v.
    Within a block the pairwise log-kernel logsumexp_f(lq_nf + lk_mf) is formed directly (block x block x F).
    """
    N = lq.shape[-2]
    log_mass = torch.full_like(lk[..., :1, :], -math.inf)  # (R, *b, 1, F)
    kv = torch.zeros(*lk.shape[:-2], lk.shape[-1], v.shape[-1], dtype=v.dtype, device=v.device)
    out = torch.empty(*lq.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, N, CAUSAL_BLOCK):
        stop = min(N, start + CAUSAL_BLOCK)
        lq_b, lk_b, v_b = lq[..., start:stop, :], lk[..., start:stop, :], v[..., start:stop, :]
        pair = torch.logsumexp(lq_b.unsqueeze(-2) + lk_b.unsqueeze(-3), dim=-1)  # (R, *b, T, T)
        ahead = torch.ones(stop - start, stop - start, dtype=torch.bool, device=v.device).triu_(1)
        pair = pair.masked_fill(ahead, -math.inf)
        past = lq_b + log_mass  # (R, *b, T, F); -inf in the first block, which has no past
        weights = torch.softmax(torch.cat([past, pair], dim=-1), dim=-1)
        F = lq.shape[-1]
        out[..., start:stop, :] = weights[..., :F] @ kv + weights[..., F:] @ v_b
        block_mass = torch.logsumexp(lk_b, dim=-2, keepdim=True)
        new_mass = torch.logaddexp(log_mass, block_mass)
        kv = torch.exp(log_mass - new_mass).transpose(-1, -2) * kv + torch.exp(lk_b - new_mass).transpose(-1, -2) @ v_b
        log_mass = new_mass
    return out


def feature_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention from features qf (*b, N, R, F), kf (*b, M, R, F) -> (R, *b, N, dv)."""
    kv = torch.einsum("...mrf,...mv->...rfv", kf, v)
    num = torch.einsum("...nrf,...rfv->...nrv", qf, kv)
    den = torch.einsum("...nrf,...rf->...nr", qf, kf.sum(-3))
    return (num / den.unsqueeze(-1)).movedim(-2, 0)


def causal_feature_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal linear attention over blocks of positions with a carried (F, dv) state."""
    N = qf.shape[-2]
    state = torch.zeros(*kf.shape[:-2], kf.shape[-1], v.shape[-1], dtype=v.dtype, device=v.device)
    mass = torch.zeros_like(kf[..., :1, :])  # (R, *b, 1, F)
    out = torch.empty(*qf.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, N, CAUSAL_BLOCK):
        stop = min(N, start + CAUSAL_BLOCK)
        qf_b, kf_b, v_b = qf[..., start:stop, :], kf[..., start:stop, :], v[..., start:stop, :]
        pair = (qf_b @ kf_b.transpose(-1, -2)).tril_()
        num = qf_b @ state + pair @ v_b
        den = (qf_b * mass).sum(-1, keepdim=True) + pair.sum(-1, keepdim=True)
        out[..., start:stop, :] = num / den
        state = state + kf_b.transpose(-1, -2) @ v_b
        mass = mass + kf_b.sum(-2, keepdim=True)
    return out
