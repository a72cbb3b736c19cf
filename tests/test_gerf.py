"""Tests of the generalised exponential features (OPRF, SDERF, SADERF) and their closed-form theory.

Every check is against an independent reference: a scalar minimiser, a hand-written float64 formula, 1-D
quadrature, an exact identity, or Monte Carlo within its interval. Statistical tests use fixed seeds (so they
are deterministic); each states the false-positive rate it would have with a fresh seed.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch
from scipy.optimize import minimize_scalar

from evalab import theory
from evalab.estimators.features import gerf_log_features, kernel_estimate, sample_omega
from evalab.estimators.gerf import (GERF_MAPS, GerfMap, GerfParams, oprf_a, optimal_a, pair_moment, pooled_rho,
                                    saderf_psi, sderf_params)

F64 = torch.float64


@functools.lru_cache(maxsize=None)
def _omega(sampler: str, replicates: int, num_features: int, d: int, seed: int) -> torch.Tensor:
    """Draws shared by the tests that use the same (sampler, R, S, d, seed) (treat as read-only)."""
    return sample_omega(sampler, replicates, num_features, d, torch.Generator().manual_seed(seed))


def _xy(n=6, m=9, d=4, scale=0.4, batch=(2,), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=g, dtype=F64) * scale
    y = torch.randn(*batch, m, d, generator=g, dtype=F64) * scale + 0.2
    return x.to(dtype), y.to(dtype)


def _objective(a: float, rho: float, d: int) -> float:
    """zoo L(A) up to the A-free terms: d log(1-4A) - (d/2) log(1-8A) + 2 (1-4A) rho / (1-8A)."""
    return d * math.log(1 - 4 * a) - d / 2 * math.log(1 - 8 * a) + 2 * (1 - 4 * a) * rho / (1 - 8 * a)


def _log_second_moment(x, y, params: GerfParams) -> torch.Tensor:
    """Mean over pairs of log E[f(x)^2 f(y)^2] for a dense A (float64, per batch element), by formula (L)."""
    d = x.shape[-1]
    eye = torch.eye(d, dtype=F64)
    basis = params.basis if params.basis is not None else eye.expand(*params.a.shape[:-1], d, d)
    a_mat = (basis * params.a.unsqueeze(-2)) @ basis.transpose(-1, -2)
    if params.psi is not None:
        x, y = x * params.psi.unsqueeze(-2), y / params.psi.unsqueeze(-2)
    z = x.unsqueeze(-2) + y.unsqueeze(-3)  # (*b, N, M, d)
    inv = torch.linalg.inv(eye - 8 * a_mat).unsqueeze(-3).unsqueeze(-3)
    quad = (z.unsqueeze(-2) @ ((eye - 4 * a_mat).unsqueeze(-3).unsqueeze(-3) @ inv) @ z.unsqueeze(-1))[..., 0, 0]
    const = torch.logdet(eye - 4 * a_mat) - 0.5 * torch.logdet(eye - 8 * a_mat)
    rows = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2)
    return (const[..., None, None] + 2 * quad - rows).mean((-2, -1))


# ----------------------------------------------------------------------------------------------------------
# parameters
def test_oprf_a_is_the_argmin_of_the_objective_and_nonpositive():
    x, y = _xy(batch=(3,), scale=0.7)
    a = oprf_a(x, y)
    rho = ((x.unsqueeze(-2) + y.unsqueeze(-3)) ** 2).sum(-1).mean((-2, -1))  # the pair mean, literally
    torch.testing.assert_close(pooled_rho(x, y), rho, rtol=1e-13, atol=0)
    for i in range(3):
        best = minimize_scalar(lambda t: _objective(t, float(rho[i]), 4), bounds=(-20, 0.1249), method="bounded",
                               options={"xatol": 1e-12})
        assert abs(float(a[i]) - best.x) < 1e-7 and a[i] <= 0
    # exactly 0 at rho = 0, no division by zero; the stable form agrees with the textbook one at rho > 0
    assert oprf_a(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)).item() == pytest.approx(0.0, abs=1e-15)
    r = torch.tensor([1e-3, 0.3, 7.0, 300.0], dtype=F64)
    textbook = (1 - 2 * r - torch.sqrt((2 * r + 1) ** 2 + 8 * r)) / 16
    torch.testing.assert_close(optimal_a(r, 1), textbook, rtol=1e-12, atol=1e-15)


def test_sderf_params_minimise_the_dense_objective():
    """The eigen-aligned A* beats isotropic OPRF and every small symmetric perturbation of itself."""
    x, y = _xy(batch=(1,), scale=0.6, d=4)
    params = GerfParams(*sderf_params(x, y))
    best = float(_log_second_moment(x, y, params))
    oprf = GerfParams(oprf_a(x, y).unsqueeze(-1).expand(1, 4))
    assert best < float(_log_second_moment(x, y, oprf)) - 1e-3
    a_mat = (params.basis * params.a.unsqueeze(-2)) @ params.basis.transpose(-1, -2)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        e = torch.randn(1, 4, 4, generator=g, dtype=F64)
        alpha, q = torch.linalg.eigh(a_mat + 1e-3 * (e + e.transpose(-1, -2)))
        assert float(_log_second_moment(x, y, GerfParams(alpha, q))) > best
    torch.testing.assert_close(pair_moment(x, y)[0], torch.einsum("nmi,nmj->ij", *(2 * [x[0][:, None] + y[0][None]]))
                               / (x.shape[-2] * y.shape[-2]), rtol=1e-12, atol=1e-14)


def test_saderf_psi_minimises_the_rescaled_objective():
    x, y = _xy(batch=(1,), scale=0.5)
    psi = saderf_psi(x, y)
    e, f = (x[0] ** 2).sum(0), (y[0] ** 2).sum(0)
    for l in range(4):
        best = minimize_scalar(lambda p: p * p * float(e[l]) + float(f[l]) / (p * p), bounds=(1e-3, 1e3),
                               method="bounded", options={"xatol": 1e-12})
        assert abs(best.x - float(psi[0, l])) < 1e-5
    torch.testing.assert_close(saderf_psi(x, y, rule="reciprocal"), 1 / psi)
    params = GerfParams.of("saderf", x, y)
    assert float(_log_second_moment(x, y, params)) < float(_log_second_moment(x, y, GerfParams.of("oprf", x, y)))
    zero = saderf_psi(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))  # an all-zero coordinate: Psi = 1, finite
    assert torch.equal(zero, torch.ones(1, 3, dtype=F64))


# ----------------------------------------------------------------------------------------------------------
# features: identities
def _kernel(m: GerfMap, omega):
    lx, ly = gerf_log_features(m, omega)
    return torch.logsumexp(lx.unsqueeze(-2) + ly.unsqueeze(-3), dim=-1).exp()


def test_importance_sampling_identity():
    """GERF features on eps == positive features at u = sqrt(1-4A) eps, times sqrt(r(u)) = D exp(A|eps|^2)."""
    x, y = _xy(batch=(1,))
    eps = sample_omega("iid", 3, 16, 4, torch.Generator().manual_seed(1))
    a = -0.2
    lx, ly = gerf_log_features(GerfMap.of("oprf", x, y, a=a), eps)
    u = math.sqrt(1 - 4 * a) * eps
    half_log_r = (4 / 4) * math.log(1 - 4 * a) + a * (eps * eps).sum(-1)  # log sqrt(r) = (d/4) log(1-4A) + A|eps|^2
    pos = lambda t: t @ u.transpose(-1, -2).unsqueeze(1) - 0.5 * (t * t).sum(-1, keepdim=True) - 0.5 * math.log(16)
    torch.testing.assert_close(lx, pos(x) + half_log_r.unsqueeze(-2).unsqueeze(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ly, pos(y) + half_log_r.unsqueeze(-2).unsqueeze(1), rtol=1e-12, atol=1e-12)


def test_sderf_isotropic_and_saderf_identity_equal_oprf():
    x, y = _xy()
    omega = sample_omega("iid", 2, 8, 4, torch.Generator().manual_seed(2))
    a = -0.17
    ref = gerf_log_features(GerfMap.of("oprf", x, y, a=a), omega)
    q, _ = torch.linalg.qr(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64))
    iso = gerf_log_features(GerfMap.build(x, y, GerfParams(torch.full((2, 4), a, dtype=F64), basis=q)), omega)
    unit = GerfMap.build(x, y, GerfParams(torch.full((2, 4), a, dtype=F64), psi=torch.ones(2, 4, dtype=F64)))
    for got in (iso, gerf_log_features(unit, omega)):
        for g_, r_ in zip(got, ref):
            torch.testing.assert_close(g_, r_, rtol=1e-12, atol=1e-12)
    # with its own optimum, saderf is oprf on (Psi x, Psi^-1 y)
    psi = saderf_psi(x, y).unsqueeze(-2)
    want = gerf_log_features(GerfMap.of("oprf", x * psi, y / psi), omega)
    for g_, r_ in zip(gerf_log_features(GerfMap.of("saderf", x, y), omega), want):
        torch.testing.assert_close(g_, r_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feature_map", GERF_MAPS)
def test_features_finite_in_float32_at_norm_10(feature_map):
    x, y = _xy(n=16, m=16, d=8, batch=(1,), seed=4, dtype=torch.float32)
    x, y = x / x.norm(dim=-1, keepdim=True) * 10, y / y.norm(dim=-1, keepdim=True) * 10
    omega = sample_omega("iid", 4, 64, 8, torch.Generator().manual_seed(0)).float()
    lx, ly = gerf_log_features(GerfMap.of(feature_map, x, y), omega)
    assert lx.dtype == torch.float32 and torch.isfinite(lx).all() and torch.isfinite(ly).all()
    est = _kernel(GerfMap.of(feature_map, x.double(), y.double()), omega.double())
    assert torch.isfinite(torch.log(est)).all()


@pytest.mark.parametrize("feature_map", GERF_MAPS)
@pytest.mark.parametrize("sampler", ["iid", "orthogonal", "qmc"])
def test_kernel_estimate_unbiased(feature_map, sampler):
    """Mean over R = 4000 (qmc: 1000, slow to draw) replicates of S = 8 draws within 4.5 standard errors of exp(x.y)
    for all 2 x 3 x 4 = 24 pairs (small norms, light tails). Per pair the false-positive rate is ~7e-6 (normal), so
    < 2e-4 per test."""
    x, y = _xy(n=3, m=4, batch=(2,), scale=0.3, seed=6)
    omega = _omega(sampler, 1000 if sampler == "qmc" else 4000, 8, 4, 7)
    est = _kernel(GerfMap.of(feature_map, x, y), omega)
    se = est.std(0) / math.sqrt(est.shape[0])
    z = (est.mean(0) - torch.exp(x @ y.transpose(-1, -2))) / se
    assert z.abs().max() < 4.5


# ----------------------------------------------------------------------------------------------------------
# theory: closed forms
def _var_ci(est: torch.Tensor, kernel: float, predicted: float, width: float = 5.0) -> None:
    """Squared error mean within ``width`` standard errors of ``predicted`` (light tails at these norms)."""
    sq = (est - kernel) ** 2
    z = (sq.mean() - predicted) / (sq.std() / math.sqrt(sq.numel()))
    assert abs(z) < width, f"measured {sq.mean():.6g}, predicted {predicted:.6g}, z = {z:.2f}"


@pytest.mark.parametrize("feature_map, a", [("oprf", -0.25), ("oprf", 0.05), ("sderf", None), ("saderf", -0.1)])
@pytest.mark.parametrize("sampler", ["iid", "orthogonal"])
def test_kernel_mse_matches_monte_carlo(feature_map, a, sampler):
    """R = 40000 replicates of S = 6 draws (d = 4: one full orthogonal block and one of 2) at |x + y|^2 ~ 0.3.
    The squared error is light-tailed here (8A < 1, small norms); |z| < 5 has a false-positive rate ~1e-6."""
    if feature_map == "sderf" and sampler == "orthogonal":
        pytest.skip("no closed form for SDERF with orthogonal draws")
    x, y = _xy(n=1, m=1, batch=(1,), scale=0.25, seed=8)
    omega = _omega(sampler, 40000, 6, 4, 9)
    params = GerfParams.of(feature_map, x, y, a=a)
    est = _kernel(GerfMap.build(x, y, params), omega).reshape(-1)
    kw = {}
    if feature_map == "sderf":
        kw["a"] = ((params.basis * params.a.unsqueeze(-2)) @ params.basis.transpose(-1, -2))[0]
    else:
        kw["a"] = float(params.a[0, 0])
    if params.psi is not None:
        kw["psi"] = params.psi[0]
    mse = theory.kernel_mse(x[0, 0], y[0, 0], num_features=6, feature_map=feature_map, sampler=sampler, **kw)
    _var_ci(est, math.exp(float(x[0, 0] @ y[0, 0])), float(mse))


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_orthogonal_kernel_mse_of_the_performer_maps_matches_monte_carlo(feature_map):
    """Same check for positive and hyperbolic features (antithetic pairs) with orthogonal blocks; |z| < 5."""
    x, y = _xy(n=1, m=1, batch=(), scale=0.3, seed=10)
    omega = sample_omega("orthogonal", 40000, 8, 4, torch.Generator().manual_seed(11))
    est = kernel_estimate(x, y, omega, feature_map).reshape(-1)
    mse = theory.kernel_mse(x[0], y[0], num_features=8, feature_map=feature_map, sampler="orthogonal")
    iid = theory.kernel_mse(x[0], y[0], num_features=8, feature_map=feature_map)
    assert mse < iid
    _var_ci(est, math.exp(float(x[0] @ y[0])), float(mse))


@pytest.mark.parametrize("d, a", [(3, 0.0), (4, -0.3), (8, -0.1)])
def test_orthogonal_covariance_matches_quadrature(d, a):
    """C_orth + K^2 = D^4 e^{-|x|^2-|y|^2} E_T[e^{2aT} Omega_d(B |z| sqrt T)], T ~ chi^2(2d), by 1-D quadrature
    (Omega_d the normalised Bessel function); also equal to 1F1 directly, and independent of a."""
    g = torch.Generator().manual_seed(d)
    x, y = torch.randn(2, d, generator=g, dtype=F64) * 0.4
    zn = float((x + y).norm())
    b, d4 = math.sqrt(1 - 4 * a), (1 - 4 * a) ** d
    nu = d / 2 - 1

    def integrand(t):
        c = b * zn * math.sqrt(t)
        omega_d = math.gamma(d / 2) * (2 / c) ** nu * scipy.special.ive(nu, c) * math.exp(c)
        return math.exp(2 * a * t) * omega_d * scipy.stats.chi2.pdf(t, 2 * d)

    quad = d4 * scipy.integrate.quad(integrand, 0, np.inf, epsabs=0, epsrel=1e-13, limit=200)[0]
    k2 = math.exp(2 * float(x @ y))
    want = math.exp(-float(x @ x) - float(y @ y)) * quad - k2
    got = float(theory.orthogonal_covariance(x, y))
    assert abs(got - want) < 1e-11 * k2
    direct = math.exp(-float(x @ x) - float(y @ y)) * (scipy.special.hyp1f1(d, d / 2, zn**2 / 2) - math.exp(zn**2))
    assert abs(got - direct) < 1e-12 * k2 and got < 0


def test_kernel_mse_reduces_and_stays_finite():
    x, y = _xy(n=1, m=1, batch=(), scale=0.5, seed=12)
    x, y = x[0], y[0]
    pos = theory.kernel_mse(x, y, num_features=5)
    torch.testing.assert_close(theory.kernel_mse(x, y, num_features=5, feature_map="oprf", a=0.0), pos, rtol=1e-13,
                               atol=0)
    torch.testing.assert_close(theory.kernel_mse(x, y, num_features=5, feature_map="sderf", a=-0.1),
                               theory.kernel_mse(x, y, num_features=5, feature_map="oprf", a=-0.1), rtol=1e-13, atol=0)
    torch.testing.assert_close(theory.kernel_mse(x, y, num_features=5, feature_map="saderf", a=-0.1),
                               theory.kernel_mse(x, y, num_features=5, feature_map="oprf", a=-0.1), rtol=1e-13, atol=0)
    big = x / x.norm() * 12
    for sampler in ("iid", "orthogonal"):
        v = theory.kernel_mse(big, big, num_features=64, feature_map="oprf", a=-5.0, sampler=sampler)
        assert torch.isfinite(v) and v > 0
    with pytest.raises(ValueError, match="needs a"):
        theory.kernel_mse(x, y, num_features=5, feature_map="oprf")
    with pytest.raises(ValueError, match="< 1/8"):
        theory.kernel_mse(x, y, num_features=5, feature_map="oprf", a=0.2)
    with pytest.raises(ValueError, match="no closed form"):
        theory.kernel_mse(x, y, num_features=5, feature_map="trig", sampler="orthogonal")


def _naive_gerf_variance(q, k, v, num_features, feature_map):
    """docs/theory.md section 8's K^(A) summed literally over (N, M, M) per head with a dense A (float64)."""
    x, y = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    params = GerfParams.of(feature_map, x, y)
    d = x.shape[-1]
    eye = torch.eye(d, dtype=F64)
    out = []
    for b in range(x.shape[0]):
        xb, yb = x[b], y[b]
        if params.psi is not None:
            xb, yb = xb * params.psi[b], yb / params.psi[b]
        basis = params.basis[b] if params.basis is not None else eye
        a_mat = (basis * params.a[b]) @ basis.T
        c = (eye - 4 * a_mat) @ torch.linalg.inv(eye - 8 * a_mat)
        pre = torch.logdet(eye - 4 * a_mat) - 0.5 * torch.logdet(eye - 8 * a_mat)
        s = 2 * xb[:, None, None] + yb[None, :, None] + yb[None, None, :]
        sq_x, sq_y = (xb * xb).sum(-1), (yb * yb).sum(-1)
        kmat = torch.exp(pre + 0.5 * torch.einsum("nabi,ij,nabj->nab", s, c, s) - sq_x[:, None, None]
                         - 0.5 * sq_y[None, :, None] - 0.5 * sq_y[None, None, :])
        w = torch.exp(xb @ yb.T)
        z = w.sum(-1)
        u = v[b][None] - ((w @ v[b]) / z[:, None])[:, None]
        out.append(torch.einsum("nab,nad,nbd->n", kmat, u, u) / z**2 / num_features)
    return torch.stack(out)


@pytest.mark.parametrize("feature_map", GERF_MAPS)
def test_rfa_theory_of_gerf_maps_matches_naive_sum(feature_map):
    g = torch.Generator().manual_seed(13)
    q, k = torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(2, 4, 5, generator=g, dtype=F64) + 0.3
    v = torch.randn(2, 4, 2, generator=g, dtype=F64)
    got = theory.rfa_bias_variance(q, k, v, num_features=7, feature_map=feature_map)
    torch.testing.assert_close(got.variance, _naive_gerf_variance(q, k, v, 7, feature_map), rtol=1e-11, atol=0)
    pos = theory.rfa_bias_variance(q, k, v, num_features=7)
    zero = theory.rfa_bias_variance(q, k, v, num_features=7, feature_map="oprf", a=0.0)
    torch.testing.assert_close(zero.variance, pos.variance, rtol=1e-13, atol=0)
    torch.testing.assert_close(zero.bias, pos.bias, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# estimators with the generalised exponential maps
def _rfa_reference(q, k, v, omega, feature_map, causal=False, a=None):
    """Literal SNIS ratio from the kernel estimate (float64, quadratic)."""
    from conftest import scaled
    kern = kernel_estimate(scaled(q), scaled(k), omega, feature_map, a=a)
    if causal:
        kern = kern.tril()
    return (kern @ v) / kern.sum(-1, keepdim=True)


@pytest.mark.parametrize("feature_map", GERF_MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_rfa_matches_float64_reference(feature_map, causal, monkeypatch):
    import evalab as ev
    from conftest import make_qkv
    from evalab.estimators.rfa import CAUSAL_BLOCK
    monkeypatch.setattr(ev.estimators.rfa, "LOG_BLOCK_ELEMENTS", 200)  # several key blocks in log space
    N = CAUSAL_BLOCK + 7
    q, k, v = make_qkv(N=N, d=6, dv=3, batch=(2,), norm=1.2)
    for gerf_a in (None, -0.3):
        est = ev.RFA(num_features=12, feature_map=feature_map, causal=causal, gerf_a=gerf_a)
        draw = est.draw(q, k, replicates=3, generator=0)
        ref = _rfa_reference(q, k, v, draw.noise, feature_map, causal, a=gerf_a)
        assert (est(q, k, v, draw) - ref).abs().max() < 1e-10
        cv = ev.ControlVariates(num_features=12, feature_map=feature_map, gerf_a=gerf_a)
        if not causal:  # the shared coefficient is RFA
            assert (cv(q, k, v, draw) - ref).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_a_zero_is_the_positive_map_bit_for_bit(causal):
    import evalab as ev
    from conftest import make_qkv
    q, k, v = make_qkv(N=40, d=8, dv=4, batch=(3,), norm=1.5, dtype=torch.float32)
    pos = ev.RFA(num_features=16, causal=causal)
    draw = pos.draw(q, k, replicates=2, generator=1)
    for fm in GERF_MAPS[:2]:  # saderf still rescales by Psi
        assert torch.equal(ev.RFA(num_features=16, feature_map=fm, causal=causal, gerf_a=0.0)(q, k, v, draw),
                           pos(q, k, v, draw))
    cv = ev.ControlVariates(num_features=16, coefficient="chunked", chunk_size=8)
    cv_zero = ev.ControlVariates(num_features=16, coefficient="chunked", chunk_size=8, feature_map="oprf", gerf_a=0.0)
    assert torch.equal(cv_zero(q, k, v, draw), cv(q, k, v, draw))


@pytest.mark.parametrize("feature_map", GERF_MAPS)
def test_rfa_finite_in_float32_at_norm_10_and_close_to_float64(feature_map):
    import evalab as ev
    from conftest import make_qkv
    q, k, v = make_qkv(N=48, d=8, dv=4, batch=(2,), norm=10.0)
    for causal in (False, True):
        est = ev.RFA(num_features=32, feature_map=feature_map, causal=causal)
        draw = est.draw(q, k, replicates=2, generator=2)
        out32 = est(q.float(), k.float(), v.float(), draw)
        assert torch.isfinite(out32).all()
        assert (out32.double() - est(q, k, v, draw)).abs().max() < 1e-3


@pytest.mark.parametrize("feature_map", GERF_MAPS)
def test_independent_noise_per_batch_element(feature_map):
    import evalab as ev
    from conftest import assert_independent_noise_per_element, make_qkv
    q, k, v = make_qkv(N=9, d=4, dv=3, batch=(2, 2), norm=1.0)
    for causal in (False, True):
        est = ev.RFA(num_features=8, feature_map=feature_map, causal=causal, shared_noise=False)
        assert_independent_noise_per_element(est, q, k, v)
    cv = ev.ControlVariates(num_features=8, feature_map=feature_map, shared_noise=False)
    assert_independent_noise_per_element(cv, q, k, v)


def test_causal_with_fixed_a_never_looks_ahead():
    """With a fixed A (gerf_a) OPRF's features depend on each position alone, so causal outputs ignore the future;
    with the optimum they see it through A only (documented)."""
    import evalab as ev
    from conftest import make_qkv
    q, k, v = make_qkv(N=50, d=4, dv=2, norm=0.8)
    k2, v2 = k.clone(), v.clone()
    k2[31:], v2[31:] = 5 * torch.randn_like(k2[31:]), torch.randn_like(v2[31:])
    fixed = ev.RFA(num_features=8, feature_map="oprf", causal=True, gerf_a=-0.2)
    draw = fixed.draw(q, k, replicates=2, generator=1)
    assert (fixed(q, k, v, draw)[:, :31] - fixed(q, k2, v2, draw)[:, :31]).abs().max() < 1e-12
    optimum = ev.RFA(num_features=8, feature_map="oprf", causal=True)
    assert (optimum(q, k, v, draw)[:, :31] - optimum(q, k2, v2, draw)[:, :31]).abs().max() > 1e-6


def test_bad_arguments_are_named():
    import evalab as ev
    with pytest.raises(ValueError, match="gerf_a applies"):
        ev.RFA(gerf_a=-0.1)
    with pytest.raises(ValueError, match="gerf_a must be < 1/8"):
        ev.RFA(feature_map="oprf", gerf_a=0.2)
    with pytest.raises(ValueError, match="eps > 0"):
        ev.RFA(feature_map="oprf", eps=1e-3)
    with pytest.raises(ValueError, match="gerf_a applies"):
        ev.ControlVariates(feature_map="hyperbolic", gerf_a=-0.1)
    with pytest.raises(ValueError, match="rule"):
        saderf_psi(torch.ones(1, 2, 3), torch.ones(1, 2, 3), rule="code")


@pytest.mark.parametrize("feature_map", GERF_MAPS)
def test_rfa_first_order_terms_match_monte_carlo(feature_map):
    """The delta-method terms with K^(A): L = (A - Y B) / Z has E|L|^2 = the predicted variance and
    Q = -(A - Y B)(B - Z) / Z^2 has E Q = the predicted bias, exactly (A = sum_m k_hat_m v_m, B = sum_m k_hat_m).
    R = 20000 replicates of S = 32 draws; z-bounds of 5 (normal approximation, light tails at this norm): variance
    5.7e-7, bias 6 components with Bonferroni 3.4e-6."""
    from conftest import make_qkv
    from evalab.estimators.softmax import softmax_attention
    q, k, v = make_qkv(N=3, M=6, d=4, dv=2, norm=0.7, seed=3)
    x, y = q * 4**-0.25, k * 4**-0.25
    kern = kernel_estimate(x, y, _omega("iid", 20000, 32, 4, 21), feature_map)  # (R, N, M)
    num, den = kern @ v, kern.sum(-1, keepdim=True)
    z = torch.exp(x @ y.T).sum(-1, keepdim=True)
    exact = softmax_attention(q, k, v)
    pred = theory.rfa_bias_variance(q, k, v, num_features=32, feature_map=feature_map)
    resid = (num - exact * den) / z
    per_rep = (resid**2).sum(dim=(-1, -2))
    z_var = (per_rep.mean() - pred.variance.sum()) / (per_rep.std() / math.sqrt(len(per_rep)))
    assert abs(z_var) < 5, f"variance: measured {per_rep.mean():.6g}, predicted {pred.variance.sum():.6g}"
    quad = -resid * (den - z) / z
    z_bias = (quad.mean(0) - pred.bias) / (quad.std(0) / math.sqrt(len(quad)))
    assert z_bias.abs().max() < 5, z_bias


@pytest.mark.parametrize("feature_map", ["sderf", "saderf"])
def test_key_variance_blocks_of_queries_share_the_parameters(feature_map):
    """key_variance over blocks of queries (a small max_memory) equals one block: the map's parameters come from
    all queries, not from each block's."""
    import evalab as ev
    from conftest import make_qkv
    q, k, v = make_qkv(N=24, M=16, d=4, dv=2, norm=1.2, seed=5)
    kw = dict(num_features=8, chunk_size=4, replicates=8, seed=0, feature_map=feature_map)
    whole = ev.key_variance(q, k, v, **kw).to_frame()
    blocks = ev.key_variance(q, k, v, max_memory=60_000, **kw).to_frame()
    torch.testing.assert_close(torch.tensor(blocks["variance"].to_numpy()), torch.tensor(whole["variance"].to_numpy()),
                               rtol=1e-9, atol=1e-14)
