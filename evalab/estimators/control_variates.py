"""The per-element control-variate view of RFA (docs/theory.md section 4).

For query n and draws w_1..w_S, per key m:
  hbar_m = phi(x_n).phi(y_m) / Z_n,   E[h_m] = exp(l_nm) / Z_n,   ghat_m = hbar_m v_m - beta_m (hbar_m - E[h_m]).
The coefficient decides what the sum over m becomes: ``shared`` (one beta) gives RFA, ``optimal`` (beta_m = v_m)
gives softmax, ``chunked`` (one beta per contiguous chunk of ``chunk_size`` keys) lies in between.
The per-element terms (quadratic in length) attribute an estimator's error to individual keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import _checks
from .base import Cost
from .draw import Draw
from .features import OmegaDraws, gerf_log_features, log_features, num_columns
from .gerf import GERF_MAPS, GerfMap, GerfParams, parameter_flops
from .scaled import Scaled

COEFFICIENTS = ("shared", "optimal", "chunked")


@dataclass(frozen=True)
class ControlVariateTerms:
    """Per-element terms of one call. hbar (R, *b, N, M); expected_h (*b, N, M);
    beta and ghat (R, *b, N, M, dv) (beta may be a broadcast view)."""

    hbar: torch.Tensor
    expected_h: torch.Tensor
    beta: torch.Tensor
    ghat: torch.Tensor


@dataclass(frozen=True)
class ControlVariates(OmegaDraws):
    """Control-variate estimate of softmax attention with a ``coefficient`` rule.

    Shares draws with RFA of the same ``num_features``, ``feature_map``, ``sampler`` and ``shared_noise``.
    feature_map: positive | hyperbolic | oprf | sderf | saderf; ``gerf_a`` fixes A = gerf_a I for the last three,
    as in RFA (None: the optimum from the call's pooled statistics).
    Call: est(q, k, v, draw) -> (R, *b, N, dv), the sum over keys of ghat_m. ``terms`` returns the elements.
    """

    num_features: int = 64
    coefficient: str = "shared"
    chunk_size: int | None = None
    feature_map: str = "positive"
    sampler: str = "iid"
    scale: float | None = None
    shared_noise: bool = True
    gerf_a: float | None = None
    budget = "num_features"  # the parameter along which the error falls (evalab.testing)

    def exact_limit(self, N: int, M: int):
        """Exact on any N, M: the optimal per-query coefficient (evalab.testing)."""
        return replace(self, coefficient="optimal", chunk_size=None)

    def __post_init__(self) -> None:
        self._check_omega_fields(("positive", "hyperbolic", *GERF_MAPS))
        _checks.choice("coefficient", self.coefficient, COEFFICIENTS)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        if self.coefficient == "chunked":
            if self.chunk_size is None:
                raise ValueError("coefficient='chunked' needs chunk_size (a positive int), got None")
            _checks.integer("chunk_size", self.chunk_size)
        elif self.chunk_size is not None:
            raise ValueError(f"chunk_size applies to coefficient='chunked' only, got chunk_size={self.chunk_size!r}")

    def gerf_params(self, q: torch.Tensor, k: torch.Tensor) -> GerfParams | None:
        """The parameters of an oprf/sderf/saderf map from all of q (*b, N, d) and k (*b, M, d) (None for the other
        maps): callers that work on blocks of queries (key_variance) pass them on, so every block uses the call's."""
        if self.feature_map not in GERF_MAPS:
            return None
        root = math.sqrt(_checks.resolve_scale(self.scale, q.shape[-1]))
        ct = _checks.compute_dtype(q, k)
        return GerfParams.of(self.feature_map, q.to(ct) * root, k.to(ct) * root, self.gerf_a)

    def log_features(self, x: torch.Tensor, y: torch.Tensor, omega: torch.Tensor,
                     params: GerfParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log phi of scaled queries x (*b, N, d) and keys y (*b, M, d): (R, *b, N, F), (R, *b, M, F); ``params``:
        the map's parameters (default: from x and y). An empty x or y (no rows) computes the other side only."""
        if self.feature_map in GERF_MAPS:
            if params is None:
                params = GerfParams.of(self.feature_map, x, y, self.gerf_a)
            return gerf_log_features(GerfMap.build(x, y, params), omega)
        return log_features(x, omega, self.feature_map), log_features(y, omega, self.feature_map)

    def _hbar(self, inp: Scaled, omega: torch.Tensor, log_z: torch.Tensor,
              params: GerfParams | None = None) -> torch.Tensor:
        """hbar (R, *b, N, M) for log Z_n (*b, N, 1); ``params``: the map's parameters (default: from inp)."""
        lx, ly = self.log_features(inp.x, inp.y, omega, params)
        a, b = lx.amax(-1, keepdim=True), ly.amax((-2, -1), keepdim=True)
        return ((lx - a).exp() @ (ly - b).exp().transpose(-1, -2)) * (a + b - log_z).exp()

    def _chunk(self, M: int) -> int:
        """Keys per coefficient: M (shared), 1 (optimal) or chunk_size (at most M)."""
        return min({"shared": M, "optimal": 1, "chunked": self.chunk_size}[self.coefficient], M)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale)
        omega = draw.for_estimator(self, q, k, inp.x)
        expected_h, log_z = _expected_h(inp)
        if self.coefficient == "optimal":  # ghat_m = E[h_m] v_m whatever the draw: no features needed
            out = (expected_h @ inp.v).expand(omega.shape[0], *expected_h.shape[:-1], inp.v.shape[-1])
            return out.to(inp.out_dtype)
        # sum_m ghat_m = sum_c beta_c sum_{m in P_c} E[h_m], beta_c = sum_{P_c} hbar_m v_m / sum_{P_c} hbar_m
        hbar = self._hbar(inp, omega, log_z)
        size = self._chunk(hbar.shape[-1])
        beta_c = chunk_coefficients(hbar, inp.v, size)
        out = (beta_c * chunked(expected_h, size).sum(-1, keepdim=True)).sum(-2)
        return out.to(inp.out_dtype)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Quadratic. Once per call: exact softmax weights (2 N M d matrix product + 4 N M elementwise); the
        optimal coefficient stops there (its output E[h] @ v, 2 N M dv, needs no draw). Per replicate otherwise:
        features (2 (N+M) S d + 2 (N+M) F), the N x M kernel estimate over F columns (2 N M F), the chunk
        coefficients (2 N M dv) and elementwise normalisation (3 N M); oprf/sderf/saderf add their parameters
        (gerf.parameter_flops)."""
        if self.coefficient == "optimal":
            return Cost.per_element(2 * N * M * (d + dv) + 4 * N * M, 0.0, 2 * N * M + N * dv, 0.0, batch=batch,
                                    itemsize=itemsize)
        S, F = self.num_features, num_columns(self.feature_map, self.num_features)
        fixed = 2 * N * M * d + 4 * N * M
        rep = 2 * (N + M) * S * d + 2 * (N + M) * F + 2 * N * M * F + 2 * N * M * dv + 3 * N * M
        if self.feature_map in GERF_MAPS:  # parameters and column terms (gerf.parameter_flops)
            gerf_fixed, per_draw = parameter_flops(self.feature_map, N=N, M=M, d=d)
            fixed, rep = fixed + gerf_fixed, rep + per_draw * S
        memory = 3 * (N + M) * F + 2 * N * M + N * dv * math.ceil(M / (self.chunk_size or M))
        return Cost.per_element(fixed, rep, 2 * N * M, memory, batch=batch, itemsize=itemsize)

    def terms(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw, *,
              max_memory: float | None = None) -> ControlVariateTerms:
        """Per-element terms (hbar, E[h], beta, ghat) of one call. Quadratic memory: ghat and beta hold
        R x N x M x dv numbers each; over ``max_memory`` bytes (default 2 GiB) this raises a MemoryError
        (pass fewer replicates or a block of queries, or use ``evalab.key_variance`` for the variances).."""
        inp, hbar, expected_h = self._kernel(q, k, v, draw)
        R, M, dv = hbar.shape[0], hbar.shape[-1], inp.v.shape[-1]
        needed = 3 * hbar.numel() * dv * hbar.element_size()  # ghat, beta and one temporary
        limit = _checks.DEFAULT_MAX_MEMORY if max_memory is None else _checks.real("max_memory", max_memory, strict=True)
        if needed > limit:
            raise MemoryError(
                f"ControlVariates.terms needs about {needed / 2**30:.3g} GiB for R x N x M x dv = "
                f"{R} x {hbar.shape[-2]} x {M} x {dv} terms (batch {tuple(hbar.shape[1:-2])}), over max_memory="
                f"{limit / 2**30:.3g} GiB; pass fewer replicates or a block of queries, raise max_memory, or use "
                "evalab.key_variance for per-key variances"
            )
        vals = inp.v.unsqueeze(-3)  # (*b, 1, M, dv)
        if self.coefficient == "optimal":
            beta = vals.expand(R, *expected_h.shape, dv)
        else:
            size = self._chunk(M)
            beta = chunk_coefficients(hbar, inp.v, size).repeat_interleave(size, dim=-2)[..., :M, :]
        ghat = hbar.unsqueeze(-1) * vals - beta * (hbar - expected_h).unsqueeze(-1)
        return ControlVariateTerms(hbar, expected_h, beta, ghat)

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw,
                params: GerfParams | None = None):
        """(scaled inputs, hbar (R, *b, N, M), E[h] (*b, N, M) in hbar's dtype) of one call (``params``: see
        :meth:`gerf_params`)."""
        inp = Scaled.of(q, k, v, self.scale)
        expected_h, log_z = _expected_h(inp)
        hbar = self._hbar(inp, draw.for_estimator(self, q, k, inp.x), log_z, params)
        return inp, hbar, expected_h.to(hbar.dtype)


def _expected_h(inp: Scaled) -> tuple[torch.Tensor, torch.Tensor]:
    """E[h_m] = exp(l_nm) / Z_n, the softmax weights (*b, N, M), and log Z_n (*b, N, 1)."""
    logits = inp.x @ inp.y.transpose(-1, -2)
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    return (logits - log_z).exp(), log_z


def chunk_coefficients(hbar: torch.Tensor, v: torch.Tensor, size: int) -> torch.Tensor:
    """The coefficient of each chunk P_c of ``size`` consecutive keys, beta_c = sum_{P_c} hbar_m v_m / sum_{P_c} hbar_m:
    hbar (R, *b, N, M), v (*b, M, dv) -> (R, *b, N, C, dv), C = ceil(M / size)."""
    h_c = chunked(hbar, size)
    return torch.einsum("r...ncm,...vcm->r...ncv", h_c, chunked(v.transpose(-1, -2), size)) / h_c.sum(-1, keepdim=True)


def chunked(t: torch.Tensor, size: int) -> torch.Tensor:
    """Split the last dimension into C = ceil(M / size) chunks of ``size``, the last one zero-padded:
    (..., M) -> (..., C, size)."""
    M = t.shape[-1]
    pad = (-M) % size
    return torch.nn.functional.pad(t, (0, pad)).unflatten(-1, (math.ceil(M / size), size))
