"""Closed-form theory for random-feature attention (docs/theory.md sections 2, 7, 8 and 9), in float64 and log space.

``kernel_mse`` gives the exact mean squared error of the random-feature estimate of the softmax kernel
exp(x.y) for the positive, hyperbolic and trig feature maps (Performer Lemma 2) and the generalised exponential
maps OPRF, SDERF and SADERF at a given A, with iid or orthogonal draws. ``rfa_bias_variance`` gives the
first-order (delta-method, O(1/S)) bias vector and variance trace of RFA, the self-normalised importance
sampling estimate of softmax attention, for iid positive, hyperbolic (antithetic) and OPRF/SDERF/SADERF
features; it returns an :class:`RFATheory`. ``measured_vs_predicted`` sets Monte-Carlo measurements against that prediction. Inputs
are in scaled coordinates for ``kernel_mse`` and raw (q, k, v) for ``rfa_bias_variance``; every exponential is
formed after its maximum has been factored out, so results overflow only when the true value exceeds float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from scipy.special import gammaln

from .. import _checks
from ..estimators.gerf import GERF_MAPS, GerfParams
from ..estimators.scaled import Scaled
from ..estimators.softmax import softmax_attention

__all__ = ["kernel_mse", "orthogonal_covariance", "rfa_bias_variance", "RFATheory", "measured_vs_predicted", "rfa_prediction"]

KERNEL_FEATURE_MAPS = ("positive", "hyperbolic", "trig", *GERF_MAPS)
RFA_FEATURE_MAPS = ("positive", "hyperbolic", *GERF_MAPS)
KERNEL_SAMPLERS = ("iid", "orthogonal")
SERIES_ELEMENTS = 2**22  # elements x terms per chunk of the orthogonal-covariance series
MEMORY_BUDGET_BYTES = 256 * 2**20  # working memory of one query block in rfa_bias_variance


def _log1mexp_neg(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-t)) for t >= 0 (-inf at t = 0), accurate for small and large t."""
    return torch.where(t > math.log(2.0), torch.log1p(-torch.exp(-t)), torch.log(-torch.expm1(-t)))


def kernel_mse(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_features: int,
    feature_map: str = "positive",
    a: float | torch.Tensor | None = None,
    psi: torch.Tensor | None = None,
    sampler: str = "iid",
) -> torch.Tensor:
    """Exact MSE of the S-draw random-feature estimate of exp(x.y) (docs/theory.md sections 2, 8, 9).

    x (..., d) and y (..., d) are scaled coordinates (x = sqrt(scale) q) whose leading dimensions broadcast;
    returns float64 of the broadcast shape (...). ``num_features`` is S, the number of omega draws (S antithetic
    pairs for ``hyperbolic``). With z = x + y, D = x - y, K = exp(x.y), the one-draw variances V_1 are
    positive e^{|z|^2} K^2 (1 - e^{-|z|^2}); hyperbolic (1/2) e^{|z|^2} K^2 (1 - e^{-|z|^2})^2;
    trig (1/2) e^{|z|^2} K^{-2} (1 - e^{-|D|^2})^2;
    oprf K^2 [((1-4A)^2/(1-8A))^(d/2) e^{|z|^2/(1-8A)} - 1] with A = ``a`` (a float or a tensor broadcasting to
    (...), < 1/8; e.g. ``features.oprf_a(x, y)`` for the optimum);
    sderf K^2 [det((I-4A)^2 (I-8A)^-1)^(1/2) e^{z^T (I-8A)^-1 z} - 1] with ``a`` the symmetric matrix A
    (..., d, d) (a float: A = a I, which is OPRF);
    saderf OPRF's on the pair (Psi x, Psi^-1 y) with ``psi`` (..., d) the diagonal of Psi (default: ones).

    sampler "iid": MSE = V_1 / S. "orthogonal" (blocks of d orthogonal directions, chi(d) norms, sizes s_b):
    MSE = V_1 / S + (sum_b s_b (s_b - 1) / S^2) C_orth, where two draws of one block have the covariance
    C_orth = e^{-|x|^2-|y|^2} [1F1(d; d/2; |z|^2/2) - e^{|z|^2}] (Kummer's function), whatever A is, for the
    positive, hyperbolic (each antithetic pair), OPRF and SADERF maps (SADERF on its rescaled pair). It is summed
    as the series sum_{k>=2} (|z|^2/2)^k / k! [(d)_k / (d/2)_k - 2^k], whose terms are all <= 0, in log space,
    so it neither cancels nor overflows. No closed form for trig or SDERF with orthogonal draws (ValueError).
    """
    for name, t in (("x", x), ("y", y)):
        if isinstance(t, torch.Tensor) and t.dim() < 1:
            raise ValueError(f"{name} must have shape (..., d), got a 0-dimensional tensor")
        _checks.tensor(name, t, min_dim=1)
    num_features = _checks.integer("num_features", num_features)
    feature_map = _checks.choice("feature_map", feature_map, KERNEL_FEATURE_MAPS)
    sampler = _checks.choice("sampler", sampler, KERNEL_SAMPLERS)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same last dimension d, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    try:
        torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    except RuntimeError as err:
        shapes = f"x {tuple(x.shape)} and y {tuple(y.shape)}"
        raise ValueError(f"{shapes} must broadcast in their leading dimensions") from err
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x on {x.device} and y on {y.device}")
    if (a is None) != (feature_map not in GERF_MAPS):
        need = "needs a (the A of the map, e.g. features.oprf_a(x, y))" if a is None else "takes no a"
        raise ValueError(f"feature_map={feature_map!r} {need}, got a={a!r}")
    if psi is not None and feature_map != "saderf":
        raise ValueError(f"psi applies to feature_map='saderf' only, got feature_map={feature_map!r}")
    if sampler == "orthogonal" and feature_map in ("trig", "sderf"):
        raise ValueError(f"sampler='orthogonal' has no closed form for feature_map={feature_map!r}; use 'iid'")
    x, y = x.to(torch.float64), y.to(torch.float64)
    if psi is not None:
        psi = torch.as_tensor(psi, dtype=torch.float64, device=x.device)
        x, y = x * psi, y / psi
    xy = (x * y).sum(-1)
    log_s = math.log(num_features)
    if feature_map == "trig":
        d_sq = ((x - y) ** 2).sum(-1)
        log_var = (x * x).sum(-1) + (y * y).sum(-1) + 2.0 * _log1mexp_neg(d_sq) - math.log(2.0)
        return torch.exp(log_var - log_s)
    z = x + y
    z_sq = (z * z).sum(-1)
    if feature_map == "positive":
        log_var = z_sq + 2.0 * xy + _log1mexp_neg(z_sq)
    elif feature_map == "hyperbolic":
        log_var = z_sq + 2.0 * xy + 2.0 * _log1mexp_neg(z_sq) - math.log(2.0)
    else:
        exponent = _gerf_exponent(feature_map, a, z, z_sq)
        log_var = 2.0 * xy + exponent + _log1mexp_neg(exponent)
    if sampler == "iid":
        return torch.exp(log_var - log_s)
    d = x.shape[-1]
    pairs = (num_features // d) * d * (d - 1) + (num_features % d) * (num_features % d - 1)
    if pairs == 0:
        return torch.exp(log_var - log_s)
    log_cov = _log_neg_orthogonal_covariance(z_sq, d) - (x * x).sum(-1) - (y * y).sum(-1)  # log(-C_orth)
    delta = log_cov + math.log(pairs / num_features) - log_var  # log of |pairs C_orth / S| / V_1 (<= 0)
    log_mse = log_var - log_s + torch.log(-torch.expm1(delta.clamp_max(0.0)))
    return torch.exp(log_mse)


def _gerf_exponent(feature_map: str, a, z: torch.Tensor, z_sq: torch.Tensor) -> torch.Tensor:
    """E = log(E[f(x)^2 f(y)^2] / K^2) >= 0 of a generalised exponential map: OPRF/SADERF
    (d/2) log1p(16 a^2 / (1 - 8a)) + |z|^2 / (1 - 8a); SDERF with A = Q diag(alpha) Q^T the sum over directions."""
    d = z.shape[-1]
    a = torch.as_tensor(a, dtype=torch.float64, device=z.device)
    if feature_map == "sderf" and a.dim() >= 2:
        if a.shape[-2:] != (d, d):
            raise ValueError(f"a for feature_map='sderf' must be a float or a (..., {d}, {d}) matrix, got {tuple(a.shape)}")
        alpha, basis = torch.linalg.eigh(a)
        _check_a(alpha)
        proj = (z.unsqueeze(-2) @ basis).squeeze(-2)  # Q^T z
        return (0.5 * torch.log1p(16.0 * alpha**2 / (1.0 - 8.0 * alpha)) + proj**2 / (1.0 - 8.0 * alpha)).sum(-1)
    _check_a(a)
    return 0.5 * d * torch.log1p(16.0 * a**2 / (1.0 - 8.0 * a)) + z_sq / (1.0 - 8.0 * a)


def _check_a(a: torch.Tensor) -> None:
    if not bool(torch.isfinite(a).all()) or bool((a >= 0.125).any()):
        raise ValueError(f"a must be finite and < 1/8 (a finite variance), got values up to {float(a.max()):.6g}")


def orthogonal_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_orth (..., ) float64: the covariance of the kernel estimates of two orthogonal draws of one block,
    e^{-|x|^2-|y|^2} [1F1(d; d/2; |z|^2/2) - e^{|z|^2}] (<= 0), for x (..., d), y (..., d) scaled; the same for
    every A of the OPRF family (docs/theory.md section 8)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    z_sq = ((x + y) ** 2).sum(-1)
    log_neg = _log_neg_orthogonal_covariance(z_sq, x.shape[-1]) - (x * x).sum(-1) - (y * y).sum(-1)
    return -torch.exp(log_neg)


def _log_neg_orthogonal_covariance(z_sq: torch.Tensor, d: int) -> torch.Tensor:
    """log(e^{|z|^2} - 1F1(d; d/2; |z|^2/2)) = logsumexp_{k>=2} [k log t - log k! + log(2^k - (d)_k/(d/2)_k)],
    t = |z|^2/2 (-inf at z = 0), over as many terms as the largest t needs (the terms peak near k = 2t)."""
    t = (0.5 * z_sq).reshape(-1)
    t_max = float(t.max()) if t.numel() else 0.0
    terms = int(2 * t_max + 12 * math.sqrt(2 * t_max + 1) + 40)
    k = np.arange(2, terms, dtype=np.float64)
    log_ratio = gammaln(d + k) - gammaln(d) - gammaln(d / 2 + k) + gammaln(d / 2)  # log (d)_k / (d/2)_k
    gap = torch.from_numpy(k * math.log(2.0) - log_ratio).to(z_sq.device)  # > 0 for k >= 2
    k_t = torch.from_numpy(k).to(z_sq.device)
    coef = _log1mexp_neg(gap) + k_t * math.log(2.0) - torch.from_numpy(gammaln(k + 1)).to(z_sq.device)
    out = torch.empty_like(t)
    rows = max(1, SERIES_ELEMENTS // len(k))
    for start in range(0, t.numel(), rows):
        log_t = torch.log(t[start:start + rows]).unsqueeze(-1)
        out[start:start + rows] = torch.logsumexp(k_t * log_t + coef, dim=-1)
    return out.reshape(z_sq.shape)


@dataclass(frozen=True, eq=False)
class RFATheory:
    """First-order (O(1/S)) theory of RFA for each query.

    bias:     (*batch, N, dv) float64, E[RFA_n] - Y_n to first order.
    variance: (*batch, N) float64, trace of the covariance of RFA_n to first order.
    num_features: S (omega draws; antithetic pairs for hyperbolic). feature_map: the feature map.
    """

    bias: torch.Tensor
    variance: torch.Tensor
    num_features: int
    feature_map: str = "positive"

    @property
    def bias2(self) -> torch.Tensor:
        """|bias|^2 per query, (*batch, N)."""
        return (self.bias * self.bias).sum(-1)

    @property
    def mse(self) -> torch.Tensor:
        """variance + |bias|^2 per query, (*batch, N)."""
        return self.variance + self.bias2

    def to_frame(self) -> pd.DataFrame:
        """One row per query: columns query, variance, bias2, mse (plus batch, a flat index, when batched)."""
        return _per_query_frame(
            self.variance.shape, {"variance": self.variance, "bias2": self.bias2, "mse": self.mse}
        )


def _per_query_frame(shape: torch.Size, columns: dict[str, object]) -> pd.DataFrame:
    """A DataFrame with a ``query`` column (and a flat ``batch`` column when shape has leading dims)."""
    *batch, n = shape
    num_batch = int(np.prod(batch)) if batch else 1
    data: dict[str, np.ndarray] = {}
    if batch:
        data["batch"] = np.repeat(np.arange(num_batch), n)
    data["query"] = np.tile(np.arange(n), num_batch)
    for name, value in columns.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        data[name] = arr.astype(np.float64).reshape(-1)
    return pd.DataFrame(data)


def rfa_bias_variance(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_features: int,
    feature_map: str = "positive",
    scale: float | None = None,
    block_size: int | None = None,
    a: float | None = None,
) -> RFATheory:
    """Delta-method bias and variance of RFA with S = ``num_features`` iid draws (docs/theory.md sections 7-9).

    q (*batch, N, d), k (*batch, M, d), v (*batch, M, dv). With x = sqrt(scale) q, y = sqrt(scale) k,
    u_m = v_m - Y_n and K_{mm'} = exp(|x_n|^2 + 2 x_n.y_m + 2 x_n.y_m' + y_m.y_m'):
    variance_n = (1/S) sum K_{mm'} u_m.u_m' / Z_n^2,   bias_n = -(1/S) sum K_{mm'} u_m / Z_n^2.
    ``hyperbolic`` (S antithetic pairs) uses (K_{mm'} + exp(-|x_n|^2 - y_m.y_m')) / 2 in place of K.
    The generalised exponential maps (``oprf``, ``sderf``, ``saderf``; A from each head's pooled statistics as
    the estimator takes it, or A = ``a`` I) use E[f(x_n)^2 f(y_m) f(y_m')] =
    det(I-4A) det(I-8A)^(-1/2) exp(s^T C s / 2 - |x_n|^2 - (|y_m|^2 + |y_m'|^2)/2), s = 2 x_n + y_m + y_m',
    C = (I-4A)(I-8A)^-1, in place of K (SADERF: on the rescaled pair (Psi x, Psi^-1 y)); A = 0 gives K.
    Queries are processed ``block_size`` at a time (default: as many as fit in ~256 MB); cost O(N M^2 dv).

    Precision: all exponentials are factored by their maxima, so large norms are accurate (1e-10 against
    50-digit arithmetic at scaled norms 12, where the terms K reach e^1000). Tiny norms are ill-conditioned:
    at scaled norms r the variance is O(r^2) (hyperbolic: O(r^4)) while the terms summed are O(1), so the
    relative error grows like 1e-16 / r^2 (hyperbolic: 1e-16 / r^4): measured 2e-11 (6e-8) at r = 0.01 and
    1e-9 (4e-4) at r = 0.001. The variance is clipped at 0.
    """
    num_features = _checks.integer("num_features", num_features)
    feature_map = _checks.choice("feature_map", feature_map, RFA_FEATURE_MAPS)
    if a is not None:
        if feature_map not in GERF_MAPS:
            raise ValueError(f"a applies to the maps {', '.join(GERF_MAPS)}, got feature_map={feature_map!r}")
        if _checks.real("a", a, minimum=-math.inf) >= 0.125:
            raise ValueError(f"a must be < 1/8 (a finite variance), got {a}")
    if block_size is not None:
        block_size = _checks.integer("block_size", block_size)
    _checks.qkv(q, k, v)  # before the float64 cast, so a wrong argument is named as given
    inp = Scaled.of(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64), scale)

    *batch, n, d = q.shape
    m, dv = v.shape[-2], v.shape[-1]
    x, y, vals = inp.x.reshape(-1, n, d), inp.y.reshape(-1, m, d), inp.v.reshape(-1, m, dv)
    if block_size is None:
        block_size = max(1, MEMORY_BUDGET_BYTES // (8 * m * (8 * dv + 8)))  # ~8 (B, M, dv) temporaries

    bias = torch.empty(x.shape[0], n, dv, dtype=torch.float64, device=q.device)
    variance = torch.empty(x.shape[0], n, dtype=torch.float64, device=q.device)
    params = GerfParams.of(feature_map, x, y, a) if feature_map in GERF_MAPS else None
    for b in range(x.shape[0]):
        xb, yb, metric, log_prefactor = x[b], y[b], None, 0.0
        if params is not None:  # C^(1/2) = Q diag(sqrt((1-4a)/(1-8a))) Q^T and log det(I-4A) det(I-8A)^(-1/2)
            alpha = params.a[b]
            if params.psi is not None:
                xb, yb = xb * params.psi[b], yb / params.psi[b]
            root = torch.sqrt((1.0 - 4.0 * alpha) / (1.0 - 8.0 * alpha))
            basis = params.basis[b] if params.basis is not None else torch.eye(d, dtype=torch.float64, device=q.device)
            metric = (basis * root) @ basis.T
            log_prefactor = float((torch.log1p(-4.0 * alpha) - 0.5 * torch.log1p(-8.0 * alpha)).sum())
        _single_head(xb, yb, vals[b], feature_map, block_size, bias[b], variance[b], metric, log_prefactor)
    bias = bias / num_features
    variance = variance.clamp_min(0.0) / num_features  # a PSD form; only rounding can make it negative
    return RFATheory(bias.reshape(*batch, n, dv), variance.reshape(*batch, n), num_features, feature_map)


def _times_exp(t: torch.Tensor, log_factor: torch.Tensor) -> torch.Tensor:
    """t * exp(log_factor) without forming exp(log_factor) alone (a zero t gives 0, not inf * 0 = nan)."""
    return torch.sign(t) * torch.exp(torch.log(t.abs()) + log_factor)


def _single_head(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, feature_map: str, block_size: int,
    bias_out: torch.Tensor, var_out: torch.Tensor, metric: torch.Tensor | None = None, log_prefactor: float = 0.0,
) -> None:
    """S * bias and S * variance for one head: x (N, d), y (M, d), v (M, dv); writes into the outputs.

    A generalised exponential map passes ``metric`` L = C^(1/2) (d, d) and the log of det(I-4A) det(I-8A)^(-1/2);
    with x~ = x L, y~ = y L the terms below become g_m = |x~|^2 - |x|^2/2 + 2 x~.y~_m + |y~_m|^2 - |y_m|^2/2 - log Z
    and G_{mm'} = exp(-|y~_m - y~_m'|^2 / 2) (L = I: the positive map's).

    Stabilisation. Since y.y' = (|y|^2 + |y'|^2)/2 - |y - y'|^2/2,
      K_{mm'} / Z^2 = exp(g_m + g_m') G_{mm'},  g_m = |x|^2/2 + 2 x.y_m + |y_m|^2/2 - log Z,
      G_{mm'} = exp(-|y_m - y_m'|^2 / 2)  (query-independent, entries in (0, 1], unit diagonal).
    K is positive semi-definite, so its largest entry is exp(2 max_m g_m), on the diagonal: factoring it out
    leaves weights w_m = exp(g_m - max g) in (0, 1] and a quadratic form whose largest term is exactly 1.
    The antithetic term exp(-|x|^2 - y.y') / Z^2 = exp(-|x|^2 - 2 log Z + h) H_{mm'} with
    H = exp(-y.y' - h), h = max(-y.y'), is a scalar per query times a fixed matrix; with c the H-weighted mean
    of v, sum H_{mm'} u_m.u_m' = tr((v - c)^T H (v - c)) + |Y_n - c|^2 sum(H) exactly (the cross term vanishes).

    Antithetic term (derivation, agrees with theory.md): one pair contributes c(w) = [c+(w) + c+(-w)] / 2 with
    c+(w) = xi(x,w) sum_m xi(y_m,w) u_m, so E|c|^2 = (E|c+|^2 + E[c+(w).c+(-w)]) / 2 by the symmetry of w, and
    E[xi(x,w) xi(y_m,w) xi(x,-w) xi(y_m',-w)] = e^{-|x|^2 - |y_m|^2/2 - |y_m'|^2/2} E[e^{w.(y_m - y_m')}]
    = exp(-|x|^2 - y_m.y_m'). The same holds for the bias moment E[c b]; both keep the 1/S factor (S pairs).
    """
    sq_y = (y * y).sum(-1)
    gram = y @ y.T
    yt = y if metric is None else y @ metric
    sq_yt = sq_y if metric is None else (yt * yt).sum(-1)
    gram_t = gram if metric is None else yt @ yt.T
    dist = (sq_yt[:, None] + sq_yt[None, :] - 2.0 * gram_t).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    g_mat = torch.exp(-0.5 * dist)  # (M, M)
    del dist, gram_t
    hyperbolic = feature_map == "hyperbolic"
    if hyperbolic:
        neg_gram = -gram
        h_max = neg_gram.max()
        h_mat = torch.exp(neg_gram - h_max)  # (M, M), entries in (0, 1]
        h_row = h_mat.sum(-1)  # (M,)
        h_total = h_row.sum()
        center = (h_row @ v) / h_total  # (dv,)
        vc = v - center
        h_const = ((h_mat @ vc) * vc).sum()  # tr((v - c)^T H (v - c))
        del neg_gram
    del gram

    n, m = x.shape[0], y.shape[0]
    for start in range(0, n, block_size):
        xb = x[start:start + block_size]  # (B, d)
        logits = xb @ y.T  # (B, M)
        log_z = torch.logsumexp(logits, dim=-1)  # (B,)
        p = torch.exp(logits - log_z[:, None])  # softmax weights
        # u_m = v_m - Y_n, centred on the value of the query's top key: when attention is peaked, Y_n is close
        # to that value and v_m - (p @ v) would cancel; (v_m - v_top) - p @ (v - v_top) does not.
        v_top = v[logits.argmax(-1)]  # (B, dv)
        rel = v[None, :, :] - v_top[:, None, :]  # (B, M, dv)
        shift = torch.bmm(p[:, None, :], rel)  # (B, 1, dv)
        u = rel - shift  # (B, M, dv)
        y_exact = v_top + shift[:, 0]  # (B, dv), exact softmax output Y_n
        sq_x = (xb * xb).sum(-1)  # (B,)
        if metric is None:
            g = 0.5 * sq_x[:, None] + 2.0 * logits + 0.5 * sq_y[None, :] - log_z[:, None]
        else:
            xt = xb @ metric
            g = ((xt * xt).sum(-1) - 0.5 * sq_x)[:, None] + 2.0 * (xt @ yt.T) + (sq_yt - 0.5 * sq_y)[None, :]
            g = g - log_z[:, None]
        g_max = g.max(dim=-1).values  # (B,)
        w = torch.exp(g - g_max[:, None])  # (B, M), in (0, 1]
        wu = w[:, :, None] * u  # (B, M, dv)
        b_size, dv = wu.shape[0], wu.shape[-1]
        # G @ (w u) for the whole block in one matrix product: (M, M) @ (M, B*dv).
        g_wu = (g_mat @ wu.permute(1, 0, 2).reshape(m, b_size * dv)).reshape(m, b_size, dv).permute(1, 0, 2)
        quad = (wu * g_wu).sum(dim=(-1, -2))  # (B,)
        s = w * (w @ g_mat)  # (B, M): w_m sum_m' G_{mm'} w_m'   (G symmetric)
        lin = (s[:, :, None] * u).sum(-2)  # (B, dv)
        log_k = 2.0 * g_max + log_prefactor  # (B,)
        var_b = _times_exp(quad, log_k)
        bias_b = -_times_exp(lin, log_k[:, None])
        if hyperbolic:
            log_h = -sq_x - 2.0 * log_z + h_max  # (B,)
            dy = y_exact - center  # (B, dv)
            quad_h = h_const + (dy * dy).sum(-1) * h_total
            lin_h = (h_row[None, :, None] * u).sum(-2)  # sum_m (H 1)_m u_m
            var_b = 0.5 * (var_b + _times_exp(quad_h, log_h))
            bias_b = 0.5 * (bias_b - _times_exp(lin_h, log_h[:, None]))
        var_out[start:start + block_size] = var_b
        bias_out[start:start + block_size] = bias_b


def measured_vs_predicted(
    measured_variance: torch.Tensor | np.ndarray,
    measured_bias2: torch.Tensor | np.ndarray,
    prediction: RFATheory,
) -> pd.DataFrame:
    """Per-query table of Monte-Carlo measurements beside the theory.

    measured_variance, measured_bias2: (*batch, N) (e.g. theory.md section 6 variance_n and bias2_n), as torch
    tensors or numpy arrays, with the shape of ``prediction.variance``. Returns columns query, variance_measured,
    variance_predicted, variance_ratio (measured / predicted), bias2_measured, bias2_predicted (plus batch, a
    flat index, when batched).
    """
    if not isinstance(prediction, RFATheory):
        raise TypeError(f"prediction must be an RFATheory, got {type(prediction).__name__}")
    expected = tuple(prediction.variance.shape)
    arrays = {}
    for name, value in (("measured_variance", measured_variance), ("measured_bias2", measured_bias2)):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().to(torch.float64).numpy()
        elif isinstance(value, np.ndarray):
            value = value.astype(np.float64)
        else:
            raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
        if value.shape != expected:
            raise ValueError(f"{name} must have shape {expected} like prediction.variance, got {value.shape}")
        arrays[name] = value
    predicted_var = prediction.variance.detach().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = arrays["measured_variance"] / predicted_var
    return _per_query_frame(
        prediction.variance.shape,
        {
            "variance_measured": arrays["measured_variance"],
            "variance_predicted": predicted_var,
            "variance_ratio": ratio,
            "bias2_measured": arrays["measured_bias2"],
            "bias2_predicted": prediction.bias2,
        },
    )


def rfa_prediction(qkv, *, feature_map: str = "positive") -> dict[str, float]:
    """Delta-method prediction for RFA on one workload (a QKV), relative to mean_n |Y_n|^2, at S = 1.

    Returns ``rel_variance_1`` and ``rel_bias2_1``: the prediction at S features is rel_variance_1 / S for the
    variance, rel_bias2_1 / S^2 for the squared bias and their sum for the MSE (docs/theory.md section 7).
    """
    q, k, v = (t.to(torch.float64) for t in qkv)
    th = rfa_bias_variance(q, k, v, num_features=1, feature_map=feature_map, scale=qkv.scale)
    y = softmax_attention(q, k, v, scale=qkv.scale)
    ref_sq = float((y * y).sum(-1).mean())
    return {"rel_variance_1": float(th.variance.mean()) / ref_sq, "rel_bias2_1": float(th.bias2.mean()) / ref_sq}
