"""Random features of the softmax kernel exp(x.y) (docs/theory.md section 2).

All functions work on *scaled* coordinates x = sqrt(scale) q. ``omega`` has shape (R, S, d), one set of S
draws per replicate shared by every batch/head element, or (R, *b, S, d), one set per batch element.

Feature maps (F feature columns, phi(x).phi(y) estimates exp(x.y) without bias):
- ``positive``   F = S:  phi_s(x) = exp(w_s.x - |x|^2/2) / sqrt(S)
- ``hyperbolic`` F = 2S: the positive features of w_s and -w_s, divided by sqrt(2S)
- ``trig``       F = 2S: exp(|x|^2/2) [cos(w_s.x), sin(w_s.x)] / sqrt(S)
- ``oprf``, ``sderf``, ``saderf``  F = S: the generalised exponential maps of :mod:`evalab.estimators.gerf`
  (OPRF / FAVOR++ and FAVOR#), whose A is set per batch element from the pooled statistics of the call's x and y
  (docs/theory.md sections 8 and 9): det(I-4A)^(1/4) exp(w^T A w + w.(I-4A)^(1/2) x - |x|^2/2) / sqrt(S).
The positive-type maps are returned as log-features, so that float32 stays finite at large norms.
Parameter helpers: ``oprf_a(x, y)``, ``sderf_params(x, y)``, ``saderf_psi(x, y)`` (see gerf.py for the formulas).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import qmc

from .. import _checks
from .draw import Draw, gaussian_noise, make_generator, noise_batch
from .gerf import GERF_MAPS, GerfMap, check_a, oprf_a, saderf_psi, sderf_params  # noqa: F401  (public helpers)
from .scaled import records_grad

FEATURE_MAPS = ("positive", "hyperbolic", "trig", *GERF_MAPS)
SAMPLERS = ("iid", "orthogonal", "qmc")


def num_columns(feature_map: str, num_features: int) -> int:
    """Number of feature columns F for S = ``num_features`` omega draws."""
    return 2 * num_features if feature_map in ("hyperbolic", "trig") else num_features


def sample_omega(sampler: str, replicates: int, num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(R, S, d) float64 omega on the generator's device; every row is marginally N(0, I_d).

    iid: independent rows. orthogonal: blocks of d orthogonal directions, each block Haar-distributed, rows
    scaled by independent chi(d) norms. qmc: scrambled Sobol points through the inverse normal CDF, an
    independent scramble per replicate.
    """
    _checks.choice("sampler", sampler, SAMPLERS)
    R, S, d = replicates, num_features, dim
    device = generator.device
    if sampler == "iid":
        return gaussian_noise(R, S, d, generator=generator)
    if sampler == "orthogonal":
        blocks = -(-S // d)
        gauss = gaussian_noise(R * blocks, d, d, generator=generator)
        if device.type == "cpu":  # numpy's batched QR is far faster than torch's on CPU
            q, r = (torch.from_numpy(t) for t in np.linalg.qr(gauss.numpy()))
        else:
            q, r = torch.linalg.qr(gauss)
        # Haar correction: QR of a Gaussian matrix fixes the signs of diag(r); undo that convention.
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        rows = q.transpose(-1, -2)  # orthonormal rows
        norms = gaussian_noise(R * blocks, d, d, generator=generator).norm(dim=-1)
        return (rows * norms.unsqueeze(-1)).reshape(R, blocks * d, d)[:, :S]
    seeds = torch.randint(0, 2**62, (R,), generator=generator, device=device).tolist()
    points = np.empty((R, S, d))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        for r, seed in enumerate(seeds):
            points[r] = qmc.Sobol(d, scramble=True, rng=np.random.default_rng(seed)).random(S)
    tiny = np.finfo(np.float64).eps
    return torch.from_numpy(ndtri(np.clip(points, tiny, 1 - tiny))).to(device)


class OmegaDraws:
    """Draws of omega for estimators with ``num_features``, ``sampler`` and ``shared_noise`` fields (RFA,
    ControlVariates): (R, S, d) shared by every batch element, or (R, *b, S, d) with ``shared_noise=False``.
    Estimators with the same sampler, num_features and sharing share draws."""

    def _check_omega_fields(self, feature_maps: tuple[str, ...]) -> None:
        """Check num_features, sampler, shared_noise, feature_map (one of ``feature_maps``) and, on estimators that
        have it, gerf_a (a fixed A of a generalised exponential map)."""
        _checks.integer("num_features", self.num_features)
        _checks.choice("sampler", self.sampler, SAMPLERS)
        _checks.boolean("shared_noise", self.shared_noise)
        _checks.choice("feature_map", self.feature_map, feature_maps)
        if getattr(self, "gerf_a", None) is not None:
            if self.feature_map not in GERF_MAPS:
                raise ValueError(f"gerf_a applies to the maps {', '.join(GERF_MAPS)}, got feature_map={self.feature_map!r}")
            check_a(self.gerf_a)

    @property
    def noise_kind(self) -> str:
        return f"omega:{self.sampler}"

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        """Shape of one replicate's noise: omega (S, d), or (*b, S, d) when each batch element has its own."""
        return (*noise_batch(q, self.shared_noise), self.num_features, q.shape[-1])

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """Sample omega for ``replicates`` estimates: Draw with noise (R, *layout), float64 on the generator's
        device; every (S, d) set is an independent sample of the sampler."""
        _checks.integer("replicates", replicates)
        *batch, S, d = self.noise_layout(q, k)
        omega = sample_omega(self.sampler, replicates * math.prod(batch), S, d, make_generator(generator))
        return Draw(omega.reshape(replicates, *batch, S, d), self.noise_kind)


def project(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """w_s.x for x (*b, N, d) and omega (R, S, d) or (R, *b, S, d): (*b, N, R, S), one GEMM per batch element."""
    R, S = omega.shape[0], omega.shape[-2]
    directions = omega.movedim(0, -3).flatten(-3, -2)  # (*b, R S, d) or (R S, d)
    return (x @ directions.transpose(-1, -2)).unflatten(-1, (R, S))


def folded_projection(x: torch.Tensor, row: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """w_s.x + row, the per-row term ``row`` (*b, N, 1) folded into the GEMM as an extra coordinate: (*b, N, R, S)."""
    return project(torch.cat([x, row], dim=-1), torch.cat([omega, torch.ones_like(omega[..., :1])], dim=-1))


def stacked_projection(x: torch.Tensor, omega: torch.Tensor, feature_map: str, *, minus_half_norm: bool) -> torch.Tensor:
    """log phi(x) up to the constant -log(F)/2, replicates second to last: (*batch, N, R, F), contiguous.

    Positive: w.x; hyperbolic: [w.x, -w.x] from one projection; minus |x|^2/2 when ``minus_half_norm`` (for
    positive features folded into the GEMM as an extra coordinate).
    """
    _checks.choice("feature_map", feature_map, ("positive", "hyperbolic"))
    if feature_map == "positive":
        return folded_projection(x, -0.5 * (x * x).sum(-1, keepdim=True), omega) if minus_half_norm else project(x, omega)
    proj = project(x, omega)
    S = proj.shape[-1]
    half = 0.5 * (x * x).sum(-1)[..., None, None] if minus_half_norm else torch.zeros((), dtype=x.dtype, device=x.device)
    if records_grad(x, omega):  # autograd does not follow out=: the same numbers through a concatenation
        return torch.cat([proj - half, half.neg() - proj], dim=-1)
    stacked = torch.empty(*proj.shape[:-1], 2 * S, dtype=proj.dtype, device=proj.device)
    torch.sub(proj, half, out=stacked[..., :S])  # each half written once, no concatenated copy
    torch.sub(half.neg(), proj, out=stacked[..., S:])
    return stacked


def log_features(x: torch.Tensor, omega: torch.Tensor, feature_map: str) -> torch.Tensor:
    """log phi(x) of a positive-type map: x (*batch, N, d), omega (R, S, d) -> (R, *batch, N, F) (a view)."""
    stacked = stacked_projection(x, omega, feature_map, minus_half_norm=True)
    return stacked.movedim(-2, 0) - 0.5 * math.log(stacked.shape[-1])


def gerf_log_features(gmap: GerfMap, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log phi of a generalised exponential map (queries (R, *b, N, S), keys (R, *b, M, S)), each side one GEMM
    on the transformed inputs with its row term folded in, plus the per-column term (see gerf.GerfMap)."""
    col = gmap.column(omega).unsqueeze(-2)  # (R, *b, 1, S)
    half_log_s = 0.5 * math.log(omega.shape[-2])
    return tuple(folded_projection(t, row, omega).movedim(-2, 0) + col - half_log_s
                 for t, row in ((gmap.x, gmap.row_x), (gmap.y, gmap.row_y)))


def trig_features(x: torch.Tensor, omega: torch.Tensor, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[cos(w.x), sin(w.x)] * exp(log_weight) / sqrt(S): (R, *batch, N, 2S), a view of a (*batch, N, R, 2S) tensor.

    ``log_weight`` (*batch, N, 1) defaults to |x|^2/2, the exact trig map; estimators pass a stabilised one.
    """
    S = omega.shape[-2]
    proj = project(x, omega)  # (*batch, N, R, S)
    if log_weight is None:
        log_weight = 0.5 * (x * x).sum(-1, keepdim=True)
    scale = torch.exp(log_weight - 0.5 * math.log(S)).unsqueeze(-1)
    return (torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1) * scale).movedim(-2, 0)


def kernel_estimate(x: torch.Tensor, y: torch.Tensor, omega: torch.Tensor, feature_map: str,
                    a: float | None = None) -> torch.Tensor:
    """phi(x_n).phi(y_m), the random-feature estimate of exp(x_n.y_m): (R, *batch, N, M). Quadratic; for analysis.

    The generalised exponential maps take their parameters from this (x, y) per batch element; ``a`` fixes A = a I
    (as RFA's ``gerf_a``)."""
    _checks.choice("feature_map", feature_map, FEATURE_MAPS)
    if a is not None and feature_map not in GERF_MAPS:
        raise ValueError(f"a applies to the maps {', '.join(GERF_MAPS)}, got feature_map={feature_map!r}")
    if feature_map == "trig":
        return trig_features(x, omega) @ trig_features(y, omega).transpose(-1, -2)
    if feature_map in GERF_MAPS:
        lx, ly = gerf_log_features(GerfMap.of(feature_map, x, y, a), omega)
    else:
        lx, ly = log_features(x, omega, feature_map), log_features(y, omega, feature_map)
    return torch.logsumexp(lx.unsqueeze(-2) + ly.unsqueeze(-3), dim=-1).exp()
