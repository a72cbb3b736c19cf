"""Data-dependent positive random features: OPRF (FAVOR++) and the FAVOR# maps SDERF and SADERF
(docs/theory.md sections 8 and 9).

All of them are the generalised exponential features of scaled inputs (x = sqrt(scale) q, y = sqrt(scale) k)

    f(w, x) = det(I - 4A)^(1/4) exp(w^T A w + w^T (I - 4A)^(1/2) x - |x|^2 / 2),     w ~ N(0, I_d),

with a symmetric A (8A < I), unbiased for exp(x.y) for every such A; A = 0 is the positive map. A is chosen per
batch element (per head) from the pooled statistics of that call's queries and keys, and shared by both, so the
kernel estimate stays unbiased conditionally on the inputs:

- ``oprf``   A = a I with a = a*(rho, d), rho = mean over pairs |x_n + y_m|^2 = mean|x|^2 + mean|y|^2 + 2 xbar.ybar.
- ``sderf``  A = Q diag(a_l) Q^T with P = mean over pairs (x_n + y_m)(x_n + y_m)^T = Q diag(sigma) Q^T and
             a_l = a*(sigma_l, 1) per eigen-direction.
- ``saderf`` OPRF on the rescaled pair (Psi x, Psi^-1 y), Psi = diag((sum_m y_ml^2 / sum_n x_nl^2)^(1/4)), which
             leaves x.y unchanged and balances the per-coordinate second moments; a = a*(rho') on the pair.

    a*(rho, d) = (1/16) [1 - 2 rho/d - sqrt((2 rho/d + 1)^2 + 8 rho/d)]  (<= 0; 0 at rho = 0)

minimises the mean over pairs of the log second moment of f(w, x) f(w, y). The parameters cost O((N + M) d)
per head (OPRF, SADERF) plus O((N + M) d^2 + d^3) (SDERF: P and its eigendecomposition).

Every map is evaluated as the positive map's projection on transformed inputs plus a per-row and a per-column
log term (:class:`GerfMap`; ``features.gerf_log_features`` assembles them):

    log phi_s(x) = -log(S)/2 + col_s + w_s.x' + row(x),
    col_s = sum_l a_l (Q^T w_s)_l^2 + (1/4) sum_l log(1 - 4 a_l),
    x' = Q diag(sqrt(1 - 4 a)) Q^T x,  row(x) = -|x|^2 / 2       (SADERF: x replaced by Psi x, y by Psi^-1 y).

ADERF (a dense asymmetric B) is not implemented: its optimum needs Gamma_x^(-1/2), undefined when a head has
fewer queries than dimensions.

Where the google-research reference code (``expplus``, ``expsharp``, ``exparf`` in
imp/max/modeling/kernel_transformation.py) differs: it divides both sums of rho by the query length, so with
N != M queries and keys get different A and the estimate is biased (here rho is pooled over the pairs); it
builds SDERF's P from unscaled q, k (a sqrt(d) larger P, a more negative A: still unbiased, off the optimum) and
drops det(I - 4A)^(1/4) (cancels in attention); its SADERF rescaling is the reciprocal of Psi* derived here
(``saderf_psi(rule="reciprocal")`` reproduces it); it adds 1e-6 to stabilised features. None of the statistics
here sees a padding mask, and causal attention takes them from the whole sequence, as that code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks

GERF_MAPS = ("oprf", "sderf", "saderf")
PSI_RULES = ("optimal", "reciprocal")


def optimal_a(rho: torch.Tensor, d: int | float) -> torch.Tensor:
    """a*(rho, d) = (1/16)[1 - 2r - sqrt((2r + 1)^2 + 8r)], r = rho / d, elementwise (rho >= 0).

    Written as -(1/16)[2r + u / (1 + sqrt(1 + u))] with u = 4r(r + 3), which has no cancellation at small rho and
    gives exactly 0 at rho = 0. The minimiser over a < 1/8 of d log(1-4a) - (d/2) log(1-8a) + 2(1-4a) rho/(1-8a).
    """
    r = rho.clamp_min(0.0) / d
    u = 4.0 * r * (r + 3.0)
    return -(2.0 * r + u / (1.0 + torch.sqrt(1.0 + u))) / 16.0


def _pooled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The means xbar (*b, d) and ybar (*b, d), float64."""
    return x.mean(-2, dtype=torch.float64), y.mean(-2, dtype=torch.float64)


def pooled_rho(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """rho = mean over pairs |x_n + y_m|^2 = mean_n |x_n|^2 + mean_m |y_m|^2 + 2 xbar.ybar: (*b,) float64."""
    xbar, ybar = _pooled(x, y)
    sq = (x * x).sum(-1).mean(-1, dtype=torch.float64) + (y * y).sum(-1).mean(-1, dtype=torch.float64)
    return (sq + 2.0 * (xbar * ybar).sum(-1)).clamp_min(0.0)


def oprf_a(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A* of OPRF per batch element: x (*b, N, d), y (*b, M, d) scaled -> (*b,) float64, a*(rho, d) with the pooled
    rho = mean_n |x_n|^2 + mean_m |y_m|^2 + 2 xbar.ybar. Always <= 0; 0 when rho = 0."""
    _check_pair(x, y)
    return optimal_a(pooled_rho(x, y), x.shape[-1])


def pair_moment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P = mean over pairs (x_n + y_m)(x_n + y_m)^T = Gamma_x + Gamma_y + xbar ybar^T + ybar xbar^T: (*b, d, d)
    float64 (the products in the inputs' dtype), with Gamma_x = mean_n x_n x_n^T. Costs 2 (N + M) d^2."""
    xbar, ybar = _pooled(x, y)
    gram = ((x.transpose(-1, -2) @ x).to(torch.float64) / x.shape[-2]
            + (y.transpose(-1, -2) @ y).to(torch.float64) / y.shape[-2])
    cross = xbar.unsqueeze(-1) * ybar.unsqueeze(-2)
    return gram + cross + cross.transpose(-1, -2)


def sderf_params(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDERF's optimum A* = Q diag(a) Q^T per batch element: returns a (*b, d) and Q (*b, d, d), float64.

    P = Q diag(sigma) Q^T (``pair_moment``), a_l = a*(sigma_l, 1) = (1/16)[1 - 2 sigma_l - sqrt((2 sigma_l + 1)^2
    + 8 sigma_l)]: OPRF's rule per eigen-direction of P. O((N + M) d^2 + d^3)."""
    _check_pair(x, y)
    sigma, basis = torch.linalg.eigh(pair_moment(x, y))
    return optimal_a(sigma, 1), basis


def saderf_psi(x: torch.Tensor, y: torch.Tensor, *, rule: str = "optimal") -> torch.Tensor:
    """SADERF's diagonal rescaling Psi (*b, d) float64: Psi_l = (sum_m y_ml^2 / sum_n x_nl^2)^(1/4), the minimiser
    of sum_l (Psi_l^2 E_l + F_l / Psi_l^2) with E_l = sum_n x_nl^2, F_l = sum_m y_ml^2; Psi_l = 1 where either sum
    is 0 (that coordinate then drops out of x.y). ``rule="reciprocal"`` returns 1/Psi, the rescaling of the
    google-research ``exparf`` code (a worse variance: kept to reproduce that code)."""
    _check_pair(x, y)
    _checks.choice("rule", rule, PSI_RULES)
    e = (x * x).sum(-2, dtype=torch.float64)
    f = (y * y).sum(-2, dtype=torch.float64)
    ok = (e > 0) & (f > 0)
    psi = torch.where(ok, (f / torch.where(ok, e, 1.0)) ** 0.25, 1.0)
    return psi if rule == "optimal" else 1.0 / psi


def parameter_flops(feature_map: str, *, N: int, M: int, d: int) -> tuple[float, float]:
    """FLOPs of a map's parameters and transforms beyond the positive map's, per batch element: (per call, per
    replicate). Per call: pooled statistics, row norms and the input transform (6 (N+M) d elementwise); SDERF adds
    the products P = Gamma_x + Gamma_y (2 (N+M) d^2), B = Q diag Q^T (2 d^3), x' = B x (2 (N+M) d^2), and the
    eigendecomposition of P (counted as 9 d^3, the order of LAPACK's; not a matrix product). Per replicate: the
    column term sum_l a_l (Q^T w)_l^2 (2 S d; SDERF also Q^T w, 2 S d^2) - S is not an argument, so the per-draw
    part is returned per draw."""
    fixed = 6.0 * (N + M) * d
    if feature_map == "sderf":
        return fixed + 4.0 * (N + M) * d * d + 11.0 * d**3, 2.0 * d + 2.0 * d * d
    return fixed, 2.0 * d


def check_a(a: object, name: str = "gerf_a") -> float:
    """A fixed A = a I: a finite float < 1/8 (the variance is infinite from 1/8 on)."""
    a = _checks.real(name, a, minimum=-math.inf)
    if a >= 0.125:
        raise ValueError(f"{name} must be < 1/8 (a finite variance), got {a}")
    return a


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    _checks.tensor("x", x)
    _checks.tensor("y", y)
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x (*b, N, d) and y (*b, M, d) must share batch dims and d, got x {tuple(x.shape)} and "
                         f"y {tuple(y.shape)}")


@dataclass(frozen=True, eq=False)
class GerfParams:
    """The data-dependent parameters of one call, per batch element (float64).

    a:     (*b, d) eigenvalues of A (all equal for OPRF and SADERF), each < 1/8.
    basis: (*b, d, d) the eigenvectors Q of A (SDERF), None for a diagonal A.
    psi:   (*b, d) the rescaling (SADERF), None for none.
    """

    a: torch.Tensor
    basis: torch.Tensor | None = None
    psi: torch.Tensor | None = None

    @classmethod
    def of(cls, feature_map: str, x: torch.Tensor, y: torch.Tensor, a: float | None = None,
           psi_rule: str = "optimal") -> "GerfParams":
        """The parameters of ``feature_map`` for scaled x (*b, N, d), y (*b, M, d). ``a`` fixes A = a I by hand
        (SADERF still rescales by Psi); None takes the optimum."""
        _checks.choice("feature_map", feature_map, GERF_MAPS)
        _check_pair(x, y)
        batch, d = x.shape[:-2], x.shape[-1]
        psi = saderf_psi(x, y, rule=psi_rule) if feature_map == "saderf" else None
        if a is not None:
            check_a(a)
            return cls(torch.full((*batch, d), float(a), dtype=torch.float64, device=x.device), psi=psi)
        if feature_map == "sderf":
            return cls(*sderf_params(x, y))
        if psi is not None:
            psi_x = psi.to(x.dtype).unsqueeze(-2)
            x, y = x * psi_x, y / psi_x
        return cls(oprf_a(x, y).unsqueeze(-1).expand(*batch, d), psi=psi)


@dataclass(frozen=True, eq=False)
class GerfMap:
    """One call's map as transformed inputs plus per-row and per-column log terms (in the inputs' dtype):
    log phi_s(x_n) = -log(S)/2 + column(omega)_s + w_s.x'_n + row_x_n, and likewise for keys.

    x: (*b, N, d) x' = B x (B = Q diag(sqrt(1 - 4a)) Q^T; SADERF B Psi x). y: (*b, M, d) likewise (Psi^-1 y).
    row_x: (*b, N, 1) -|x|^2/2 (SADERF -|Psi x|^2/2). row_y: (*b, M, 1).
    params: the :class:`GerfParams` it was built from.
    """

    x: torch.Tensor
    y: torch.Tensor
    row_x: torch.Tensor
    row_y: torch.Tensor
    params: GerfParams

    @classmethod
    def of(cls, feature_map: str, x: torch.Tensor, y: torch.Tensor, a: float | None = None,
           psi_rule: str = "optimal") -> "GerfMap":
        """Parameters (:meth:`GerfParams.of`) and transformed inputs for scaled x (*b, N, d), y (*b, M, d)."""
        return cls.build(x, y, GerfParams.of(feature_map, x, y, a, psi_rule))

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor, params: GerfParams) -> "GerfMap":
        """The map of given parameters (see :class:`GerfParams`)."""
        if params.psi is not None:
            psi = params.psi.to(x.dtype).unsqueeze(-2)
            x, y = x * psi, y / psi
        root = torch.sqrt(1.0 - 4.0 * params.a)  # (*b, d)
        row_x, row_y = -0.5 * (x * x).sum(-1, keepdim=True), -0.5 * (y * y).sum(-1, keepdim=True)
        if params.basis is None:
            diag = root.to(x.dtype).unsqueeze(-2)
            return cls(x * diag, y * diag, row_x, row_y, params)
        b_mat = ((params.basis * root.unsqueeze(-2)) @ params.basis.transpose(-1, -2)).to(x.dtype)  # symmetric
        return cls(x @ b_mat, y @ b_mat, row_x, row_y, params)

    def column(self, omega: torch.Tensor) -> torch.Tensor:
        """col_s = sum_l a_l (Q^T w_s)_l^2 + (1/4) sum_l log(1 - 4 a_l): omega (R, S, d) shared by the batch, or
        (R, *b, S, d) per batch element -> (R, *b, S) in omega's dtype."""
        a = self.params.a
        batch = a.shape[:-1]
        if omega.dim() == 3:
            omega = omega.reshape(omega.shape[0], *(1,) * len(batch), *omega.shape[1:])
        if self.params.basis is not None:
            omega = omega @ self.params.basis.to(omega.dtype)
        quad = torch.einsum("r...sd,...d->r...s", omega * omega, a.to(omega.dtype))
        log_det = 0.25 * torch.log1p(-4.0 * a).sum(-1)  # (*b,)
        return quad + log_det.to(omega.dtype).unsqueeze(-1)
