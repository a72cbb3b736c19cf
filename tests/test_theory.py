"""Tests of evalab.measure.theory: the closed forms against quadrature, Monte Carlo, a naive float64 sum and mpmath.

Statistical tests use fixed seeds (so they are deterministic); each states the false-positive rate it would have
with a fresh seed.
"""
from __future__ import annotations

import functools
import math
from math import comb

import mpmath
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evalab import theory
from evalab.estimators.features import kernel_estimate, log_features, sample_omega
from evalab.estimators.rfa import RFA
from evalab.estimators.softmax import softmax_attention

F64 = torch.float64
MAPS = ("positive", "hyperbolic", "trig")


# ----------------------------------------------------------------------------------------------------------
# helpers
def _pair(sq_z: float, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scaled x, y in R^d (shape (d,)) rescaled so that |x + y|^2 = sq_z."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, d, generator=g, dtype=F64)
    c = math.sqrt(sq_z) / (x + y).norm()
    return x * c, y * c


def _raw_moment(power: int, feature_map: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E[f^power] of one draw f of the kernel estimate (one omega; one antithetic pair for hyperbolic).

    positive f = e^{w.z - c}, hyperbolic f = cosh(w.z) e^{-c}, trig f = cos(w.D) e^{c}, c = (|x|^2 + |y|^2)/2;
    cosh^p and cos^p are expanded binomially into exponentials of w, whose Gaussian means are closed form.
    """
    c = 0.5 * ((x * x).sum(-1) + (y * y).sum(-1))
    sq_z, sq_d = ((x + y) ** 2).sum(-1), ((x - y) ** 2).sum(-1)
    p = power
    if feature_map == "positive":
        return torch.exp(p * p * sq_z / 2 - p * c)
    if feature_map == "hyperbolic":
        return sum(comb(p, j) * torch.exp((2 * j - p) ** 2 * sq_z / 2) for j in range(p + 1)) / 2**p * torch.exp(-p * c)
    return sum(comb(p, j) * torch.exp(-((2 * j - p) ** 2) * sq_d / 2) for j in range(p + 1)) / 2**p * torch.exp(p * c)


def _naive_rfa_theory(q, k, v, num_features, feature_map, scale=None):
    """Section 7 formulas summed literally in float64: K as an (N, M, M) tensor, then einsum."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    x, y = q * math.sqrt(s), k * math.sqrt(s)
    logits = x @ y.transpose(-1, -2)
    z = logits.exp().sum(-1)
    out = (logits.exp() @ v) / z[..., None]
    sq_x = (x * x).sum(-1)[..., :, None, None]
    gram = (y @ y.transpose(-1, -2))[..., None, :, :]
    kmat = torch.exp(sq_x + 2 * logits[..., :, :, None] + 2 * logits[..., :, None, :] + gram)
    if feature_map == "hyperbolic":
        kmat = 0.5 * (kmat + torch.exp(-sq_x - gram))
    u = v[..., None, :, :] - out[..., :, None, :]  # (..., N, M, dv)
    variance = torch.einsum("...nab,...nad,...nbd->...n", kmat, u, u) / z**2 / num_features
    bias = -torch.einsum("...nab,...nad->...nd", kmat, u) / z[..., None] ** 2 / num_features
    return bias, variance


def _inputs(n, m, d, dv, norm, seed):
    """q, k with scaled norms |x| = |y| = norm (default scale d**-0.5), v standard normal; float64."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=g, dtype=F64), torch.randn(m, d, generator=g, dtype=F64)
    v = torch.randn(m, dv, generator=g, dtype=F64)
    root = d**0.25  # 1 / sqrt(scale)
    return q / q.norm(dim=-1, keepdim=True) * norm * root, k / k.norm(dim=-1, keepdim=True) * norm * root, v


# ----------------------------------------------------------------------------------------------------------
# kernel_mse
@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("d, num_features", [(2, 1), (1, 2)])
def test_kernel_mse_matches_gauss_hermite_quadrature(feature_map, d, num_features):
    """Exact check, independent of the closed form: E[(phi(x).phi(y) - e^{x.y})^2] by tensor-product
    Gauss-Hermite quadrature over all d * S omega coordinates, with phi from evalab.estimators.features."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / math.sqrt(2 * math.pi)
    dims = d * num_features
    grid = torch.cartesian_prod(*[torch.from_numpy(nodes)] * dims).reshape(-1, num_features, d)
    wgrid = torch.cartesian_prod(*[torch.from_numpy(weights)] * dims).reshape(-1, dims).prod(-1)
    for sq_z in (0.3, 1.0, 2.0):
        x, y = _pair(sq_z, d, seed=int(10 * sq_z))
        est = kernel_estimate(x[None], y[None], grid, feature_map)[:, 0, 0]  # (P,)
        quad = (wgrid * (est - torch.exp(x @ y)) ** 2).sum()
        closed = theory.kernel_mse(x, y, num_features=num_features, feature_map=feature_map)
        assert closed.dtype == F64 and closed.shape == ()
        torch.testing.assert_close(closed, quad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("feature_map", MAPS)
def test_kernel_mse_matches_monte_carlo(feature_map):
    """Brute-force Monte Carlo of kernel_estimate: R = 200000 replicates of S = 4 iid draws at |x + y|^2 = 1.

    The squared error X = (est - K)^2 is heavy-tailed (log-normal), so z uses the exact standard error
    sqrt(Var X / R), from the closed-form raw moments E[f^p], p <= 4 (binomial expansion, no kernel_mse).
    False-positive rate of |z| < 6: lower tail rigorously <= exp(-t^2 Var X / (2 E X^2)) = 3e-8 (positive,
    hyperbolic), 1e-5 (trig) (Maurer's bound for means of non-negative variables); the upper tail is heavier than normal: in a calibration run of
    1000 fresh seeds per map at |x + y|^2 = 1 (which fixes the law of z for positive and hyperbolic; trig is
    bounded) the largest |z| was 4.85, so the rate of |z| >= 6 is below ~1e-3 per map.
    (At |x + y|^2 = 2 the upper tail is too heavy for a tight z-bound; quadrature above covers that range.)
    """
    num_features, replicates, d = 4, 200_000, 3
    x, y = _pair(1.0, d, seed=3)
    gen = torch.Generator().manual_seed(2024)
    omega = sample_omega("iid", replicates, num_features, d, gen)
    kernel = torch.exp(x @ y)
    sq_err = (kernel_estimate(x[None], y[None], omega, feature_map)[:, 0, 0] - kernel) ** 2
    moments = [_raw_moment(p, feature_map, x, y) for p in range(5)]
    mu2 = moments[2] - kernel**2
    mu4 = moments[4] - 4 * kernel * moments[3] + 6 * kernel**2 * moments[2] - 3 * kernel**4
    s = num_features
    fourth = mu4 / s**3 + 3 * (s - 1) * mu2**2 / s**3  # E[(mean of S draws - K)^4]
    mse = theory.kernel_mse(x, y, num_features=s, feature_map=feature_map)
    torch.testing.assert_close(mse, mu2 / s, rtol=1e-12, atol=0)
    se = torch.sqrt((fourth - mse**2) / replicates)
    z = (sq_err.mean() - mse) / se
    assert abs(z) < 6, f"{feature_map}: measured {sq_err.mean():.6g}, predicted {mse:.6g}, z = {z:.2f}"
    assert se / mse < 0.02  # the check is tight: 6 standard errors are < 12% of the MSE


@pytest.mark.parametrize("sq_z", [1e-14, 1e-7, 1e-3, 0.5, 3.0, 40.0])
def test_kernel_mse_is_accurate_at_small_and_large_norms(sq_z):
    """Against algebraically rearranged forms: positive K^2 expm1(|z|^2) / S, hyperbolic 2 K^2 sinh^2(|z|^2/2) / S,
    trig e^{|x|^2+|y|^2} expm1(-|D|^2)^2 / (2S). Relative 1e-13 even where 1 - e^{-|z|^2} would cancel."""
    x, y = _pair(sq_z, 4, seed=7)
    s = 3
    k2 = torch.exp(2 * (x @ y))
    sq_d = ((x - y) ** 2).sum()
    expected = {
        "positive": k2 * torch.expm1(torch.tensor(sq_z, dtype=F64)) / s,
        "hyperbolic": 2 * k2 * torch.sinh(torch.tensor(sq_z / 2, dtype=F64)) ** 2 / s,
        "trig": torch.exp((x * x).sum() + (y * y).sum()) * torch.expm1(-sq_d) ** 2 / (2 * s),
    }
    for feature_map, value in expected.items():
        got = theory.kernel_mse(x, y, num_features=s, feature_map=feature_map)
        torch.testing.assert_close(got, value, rtol=1e-13, atol=0)


def test_kernel_mse_zero_when_exact():
    """z = 0 gives an exact positive/hyperbolic estimate; D = 0 an exact trig one."""
    x = torch.tensor([0.3, -0.2], dtype=F64)
    assert theory.kernel_mse(x, -x, num_features=2, feature_map="positive") == 0
    assert theory.kernel_mse(x, -x, num_features=2, feature_map="hyperbolic") == 0
    assert theory.kernel_mse(x, x, num_features=2, feature_map="trig") == 0


def test_kernel_mse_broadcasts():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    for feature_map in MAPS:
        got = theory.kernel_mse(x, y, num_features=8, feature_map=feature_map)
        assert got.shape == (4, 5)
        for i in range(4):
            for j in range(5):
                one = theory.kernel_mse(x[i, 0], y[j], num_features=8, feature_map=feature_map)
                torch.testing.assert_close(got[i, j], one, rtol=1e-15, atol=0)
    # float32 input is computed in float64
    assert theory.kernel_mse(x.float(), y.float(), num_features=1).dtype == F64


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    st.integers(1, 1000),
)
def test_kernel_mse_properties(xs, ys, s):
    """MSE >= 0, exactly proportional to 1/S, and S antithetic pairs never worse than 2S iid positive draws."""
    x, y = torch.tensor(xs, dtype=F64), torch.tensor(ys, dtype=F64)
    for feature_map in MAPS:
        mse = theory.kernel_mse(x, y, num_features=s, feature_map=feature_map)
        one = theory.kernel_mse(x, y, num_features=1, feature_map=feature_map)
        assert mse >= 0 and torch.isfinite(mse)
        torch.testing.assert_close(mse * s, one, rtol=1e-13, atol=0)
    hyp = theory.kernel_mse(x, y, num_features=s, feature_map="hyperbolic")
    assert hyp <= theory.kernel_mse(x, y, num_features=2 * s, feature_map="positive") * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------------------
# rfa_bias_variance: exact, deterministic checks
@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_rfa_theory_matches_naive_sum(feature_map):
    """The stabilised quadratic forms equal the literal (N, M, M) einsum of docs/theory.md section 7 (tiny case)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    v = torch.randn(4, 2, generator=g, dtype=F64)
    for scale in (None, 0.7):
        bias, variance = _naive_rfa_theory(q, k, v, 7, feature_map, scale)
        got = theory.rfa_bias_variance(q, k, v, num_features=7, feature_map=feature_map, scale=scale)
        torch.testing.assert_close(got.variance, variance, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.bias, bias, rtol=1e-12, atol=1e-12 * bias.abs().max().item())
        assert got.num_features == 7 and got.feature_map == feature_map


def test_rfa_theory_batched_equals_per_head():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 5, 4, generator=g, dtype=F64), torch.randn(2, 3, 6, 4, generator=g, dtype=F64)
    v = torch.randn(2, 3, 6, 2, generator=g, dtype=F64)
    got = theory.rfa_bias_variance(q, k, v, num_features=4, feature_map="hyperbolic")
    assert got.bias.shape == (2, 3, 5, 2) and got.variance.shape == (2, 3, 5)
    bias, variance = _naive_rfa_theory(q, k, v, 4, "hyperbolic")
    torch.testing.assert_close(got.variance, variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.bias, bias, rtol=1e-11, atol=1e-12 * bias.abs().max().item())
    frame = got.to_frame()
    assert list(frame.columns) == ["batch", "query", "variance", "bias2", "mse"] and len(frame) == 30


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_rfa_theory_large_norms_finite_and_block_invariant(feature_map):
    """Scaled norms |x| = |y| = 5: finite, positive; block sizes 1, 7 and the default agree to 1e-12."""
    q, k, v = _inputs(20, 24, 8, 4, norm=5.0, seed=3)
    results = [
        theory.rfa_bias_variance(q, k, v, num_features=16, feature_map=feature_map, block_size=b)
        for b in (None, 1, 7)
    ]
    ref = results[0]
    assert torch.isfinite(ref.variance).all() and torch.isfinite(ref.bias).all() and (ref.variance > 0).all()
    bias, variance = _naive_rfa_theory(q, k, v, 16, feature_map)  # the literal sum; at norm 5 its terms reach e^50
    torch.testing.assert_close(ref.variance, variance, rtol=1e-11, atol=0)
    torch.testing.assert_close(ref.bias, bias, rtol=1e-11, atol=1e-11 * bias.abs().max().item())
    for other in results[1:]:
        torch.testing.assert_close(other.variance, ref.variance, rtol=1e-12, atol=0)
        torch.testing.assert_close(other.bias, ref.bias, rtol=1e-12, atol=1e-12 * ref.bias.abs().max().item())


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
@pytest.mark.parametrize("norm", [0.1, 5.0, 12.0])
def test_rfa_theory_matches_mpmath_where_float64_overflows(feature_map, norm):
    """50-digit mpmath evaluation of the literal sums. At scaled norm 12 the terms K_{mm'} reach e^{1000}
    (float64 overflows: the naive sum is inf/nan) while K / Z^2 stays representable; log space keeps 1e-10.
    (Peaked attention also needs v_m - Y_n formed without cancellation: v_m - p @ v lost all digits here.)"""
    q, k, v = _inputs(2, 3, 3, 2, norm=norm, seed=4)
    q = q + 0.3 * k[:2]  # align queries with keys so the attention is peaked and the terms huge
    got = theory.rfa_bias_variance(q, k, v, num_features=3, feature_map=feature_map)
    with mpmath.workdps(50):
        _check_against_mpmath(got, q, k, v, feature_map)
    if norm == 12.0:
        _, naive_var = _naive_rfa_theory(q, k, v, 3, feature_map)
        assert not torch.isfinite(naive_var).all()


def _check_against_mpmath(got, q, k, v, feature_map):
    """The literal sums of docs/theory.md section 7 at the current mpmath precision (S = 3, d = 3, M = 3, dv = 2)."""
    s = mpmath.mpf(3) ** mpmath.mpf(-0.5)
    x = [[mpmath.mpf(float(a)) * mpmath.sqrt(s) for a in row] for row in q.tolist()]
    y = [[mpmath.mpf(float(a)) * mpmath.sqrt(s) for a in row] for row in k.tolist()]
    vals = [[mpmath.mpf(float(a)) for a in row] for row in v.tolist()]
    dot = lambda a, b: mpmath.fsum(ai * bi for ai, bi in zip(a, b))  # noqa: E731
    for n, xn in enumerate(x):
        e = [mpmath.exp(dot(xn, ym)) for ym in y]
        z = mpmath.fsum(e)
        out = [mpmath.fsum(e[m] * vals[m][j] for m in range(3)) / z for j in range(2)]
        u = [[vals[m][j] - out[j] for j in range(2)] for m in range(3)]
        var, bias = mpmath.mpf(0), [mpmath.mpf(0)] * 2
        for a in range(3):
            for b in range(3):
                kab = mpmath.exp(dot(xn, xn) + 2 * dot(xn, y[a]) + 2 * dot(xn, y[b]) + dot(y[a], y[b]))
                if feature_map == "hyperbolic":
                    kab = (kab + mpmath.exp(-dot(xn, xn) - dot(y[a], y[b]))) / 2
                var += kab * dot(u[a], u[b])
                bias = [bias[j] - kab * u[a][j] for j in range(2)]
        assert float(got.variance[n]) == pytest.approx(float(var / z**2 / 3), rel=1e-10)
        for j in range(2):
            assert float(got.bias[n, j]) == pytest.approx(float(bias[j] / z**2 / 3), rel=1e-9)


def test_rfa_theory_variance_is_exactly_one_over_S():
    q, k, v = _inputs(5, 7, 4, 3, norm=1.0, seed=5)
    for feature_map in ("positive", "hyperbolic"):
        one = theory.rfa_bias_variance(q, k, v, num_features=32, feature_map=feature_map)
        two = theory.rfa_bias_variance(q, k, v, num_features=64, feature_map=feature_map)
        torch.testing.assert_close(2 * two.variance, one.variance, rtol=1e-15, atol=0)
        torch.testing.assert_close(2 * two.bias, one.bias, rtol=1e-15, atol=0)
        torch.testing.assert_close(one.mse, one.variance + (one.bias**2).sum(-1), rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------------
# rfa_bias_variance against Monte-Carlo RFA
def _replicates(num_features: int) -> int:
    """R = 20000 at S = 64, 10000 at 128, 5000 at 256: a fixed cost R * S, so the file stays fast (the standard
    errors below are measured from the replicates, so a smaller R only widens the tolerances)."""
    return 1_280_000 // num_features


def _snis_parts(x, y, v, omega, feature_map):
    """SNIS numerator A and denominator B (A / B = RFA) from the positive-type features of evalab.estimators.features."""
    phi_x, phi_y = log_features(x, omega, feature_map).exp(), log_features(y, omega, feature_map).exp()
    return phi_x @ (phi_y.transpose(-1, -2) @ v), phi_x @ phi_y.sum(-2)[..., None]


def _denominator(x, y, omega, feature_map):
    """B = sum_f phi_f(x_n) sum_m phi_f(y_m), (R, N, 1), computed column-sign by column-sign (fast path)."""
    r, s, d = omega.shape
    flat = omega.reshape(r * s, d)
    px, py = (flat @ x.T).reshape(r, s, -1), (flat @ y.T).reshape(r, s, -1)  # (R, S, N), (R, S, M)
    hx, hy = 0.5 * (x * x).sum(-1), 0.5 * (y * y).sum(-1)
    signs = (1.0,) if feature_map == "positive" else (1.0, -1.0)
    den = 0
    for sign in signs:  # small norms: the linear domain is safe in float64
        key_mass = torch.exp(sign * py - hy).sum(-1)  # (R, S)
        den = den + torch.bmm(key_mass[:, None, :], torch.exp(sign * px - hx))[:, 0]  # (R, N)
    return (den / (s * len(signs)))[..., None]


@functools.lru_cache(maxsize=None)
def _rfa_monte_carlo(feature_map: str, num_features: int):
    """RFA replicates at small norms (d = 4, N = M = 6, dv = 3, scaled norms 0.5) with the SNIS numerator A
    and denominator B of the same draws. B is rebuilt from the features; A = RFA * B, checked on 200
    replicates against a direct reference built from evalab.estimators.features."""
    q, k, v = _inputs(6, 6, 4, 3, norm=0.5, seed=11)
    est = RFA(num_features=num_features, feature_map=feature_map, sampler="iid")
    gen = torch.Generator().manual_seed(num_features)
    draw = est.draw(q, k, replicates=_replicates(num_features), generator=gen)
    out = est(q, k, v, draw)  # (R, N, dv)
    x, y = q * 4**-0.25, k * 4**-0.25  # scaled coordinates, scale = d**-0.5
    den = _denominator(x, y, draw.noise, feature_map)
    num = out * den
    ref_num, ref_den = _snis_parts(x, y, v, draw.noise[:200], feature_map)
    torch.testing.assert_close(ref_den, den[:200], rtol=1e-12, atol=0)
    torch.testing.assert_close(ref_num, num[:200], rtol=1e-10, atol=1e-12)
    z = (x @ y.T).exp().sum(-1)[:, None]
    exact = softmax_attention(q, k, v)
    theory_ = theory.rfa_bias_variance(q, k, v, num_features=num_features, feature_map=feature_map)
    return out, num, den, z, exact, theory_


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
@pytest.mark.parametrize("num_features", [64, 256])
def test_rfa_first_order_terms_match_monte_carlo(feature_map, num_features):
    """The delta-method terms themselves, with no truncation error: the linear term L = (A - Y B) / Z has
    E|L|^2 = predicted variance exactly, and Q = -(A - Y B)(B - Z) / Z^2 has E Q = predicted bias exactly.
    This pins the K matrix (and the antithetic term exp(-|x|^2 - y.y')) to ~1% relative precision.
    z-bounds of 5 (normal approximation; tails are light at these norms): variance sum 5.7e-7, bias
    18 components with Bonferroni 1e-5."""
    out, num, den, z, exact, pred = _rfa_monte_carlo(feature_map, num_features)
    resid = (num - exact * den) / z  # (R, N, dv)
    per_rep = (resid**2).sum(dim=(-1, -2))  # (R,), mean = sum_n predicted variance_n
    z_var = (per_rep.mean() - pred.variance.sum()) / (per_rep.std() / math.sqrt(len(out)))
    assert abs(z_var) < 5, f"variance sum: measured {per_rep.mean():.6g}, predicted {pred.variance.sum():.6g}"
    quad = -resid * (den - z) / z  # (R, N, dv)
    z_bias = (quad.mean(0) - pred.bias) / (quad.std(0) / math.sqrt(len(out)))
    assert z_bias.abs().max() < 5, z_bias


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
@pytest.mark.parametrize("num_features", [64, 256])
def test_rfa_bias_variance_matches_monte_carlo(feature_map, num_features):
    """Measured RFA (evalab.estimators.rfa) against the prediction.

    Variance: sum over queries of the sample variance, tolerance 5 standard errors (normal approximation,
    false-positive rate 6e-7) plus 4/S for the O(1/S^2) terms the delta method drops (observed ~2/S here).
    Bias: every component within 5 standard errors of the plain mean (18 components, Bonferroni 1e-5); and the
    control-variate mean of RFA - Y - L (same expectation, 10x smaller error) within 4/S relative plus
    5 root-sum-square standard errors (Markov on the squared norm: <= 4%; ~1e-9 under normality).
    """
    out, num, den, z, exact, pred = _rfa_monte_carlo(feature_map, num_features)
    err = out - exact  # (R, N, dv)
    centred = ((err - err.mean(0)) ** 2).sum(dim=(-1, -2))  # (R,)
    measured = out.var(0).sum(-1)  # (N,)
    se = centred.std() / math.sqrt(len(out))
    tol = 5 * se + 4 / num_features * pred.variance.sum()
    assert abs(measured.sum() - pred.variance.sum()) < tol, (measured.sum(), pred.variance.sum(), tol)

    z_bias = (err.mean(0) - pred.bias) / (err.std(0) / math.sqrt(len(out)))
    assert z_bias.abs().max() < 5, z_bias
    cv = err - (num - exact * den) / z
    cv_se = cv.std(0) / math.sqrt(len(out))
    gap = (cv.mean(0) - pred.bias).norm()
    assert gap < 4 / num_features * pred.bias.norm() + 5 * cv_se.norm(), (gap, pred.bias.norm())

    frame = theory.measured_vs_predicted(measured, (err.mean(0) ** 2).sum(-1) - measured / len(out), pred)
    assert list(frame.columns) == [
        "query", "variance_measured", "variance_predicted", "variance_ratio", "bias2_measured", "bias2_predicted",
    ]
    np.testing.assert_allclose(frame["variance_ratio"], (measured / pred.variance).numpy(), rtol=1e-15)
    assert frame["variance_ratio"].between(0.8, 1.2).all()


def test_rfa_measured_variance_halves_when_S_doubles():
    """Measured variance sums at S = 128 and 256 (independent draws): ratio 2 within 5 combined standard
    errors (normal approximation, false-positive rate 6e-7) plus 4/128 for the O(1/S^2) terms."""
    sums, ses = [], []
    for s in (128, 256):
        out, *_ = _rfa_monte_carlo("positive", s)
        centred = ((out - out.mean(0)) ** 2).sum(dim=(-1, -2))
        sums.append(centred.mean())
        ses.append(centred.std() / math.sqrt(len(out)))
    ratio = sums[0] / sums[1]
    rel_se = math.sqrt((ses[0] / sums[0]) ** 2 + (ses[1] / sums[1]) ** 2)
    assert abs(ratio - 2) < 2 * (5 * rel_se + 4 / 128), ratio
    pred = [_rfa_monte_carlo("positive", s)[-1].variance.sum() for s in (128, 256)]
    assert pred[0] / pred[1] == pytest.approx(2, rel=1e-15)


# ----------------------------------------------------------------------------------------------------------
# frames and bad input
def test_to_frame_and_measured_vs_predicted():
    q, k, v = _inputs(4, 5, 3, 2, norm=1.0, seed=6)
    pred = theory.rfa_bias_variance(q, k, v, num_features=10)
    frame = pred.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["query", "variance", "bias2", "mse"]
    np.testing.assert_array_equal(frame["query"], np.arange(4))
    np.testing.assert_allclose(frame["mse"], frame["variance"] + frame["bias2"], rtol=1e-15)
    np.testing.assert_allclose(frame["bias2"], (pred.bias**2).sum(-1).numpy(), rtol=1e-15)
    measured = np.array([1.0, 2.0, 3.0, 4.0])
    table = theory.measured_vs_predicted(measured, torch.zeros(4), pred)
    np.testing.assert_allclose(table["variance_ratio"], measured / pred.variance.numpy(), rtol=1e-15)
    np.testing.assert_allclose(table["bias2_predicted"], frame["bias2"], rtol=1e-15)
    with pytest.raises(ValueError, match="measured_variance"):
        theory.measured_vs_predicted(np.ones(3), np.ones(4), pred)
    with pytest.raises(TypeError, match="measured_bias2"):
        theory.measured_vs_predicted(np.ones(4), [0.0] * 4, pred)
    with pytest.raises(TypeError, match="prediction"):
        theory.measured_vs_predicted(np.ones(4), np.ones(4), frame)


def test_bad_input_names_the_argument():
    x = torch.zeros(2, 3, dtype=F64)
    q, k, v = _inputs(3, 4, 3, 2, norm=1.0, seed=0)
    with pytest.raises(ValueError, match="feature_map='cosine'.*'positive', 'hyperbolic', 'trig'"):
        theory.kernel_mse(x, x, num_features=1, feature_map="cosine")
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        theory.kernel_mse(x, x, num_features=0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        theory.kernel_mse(x, x, num_features=2.5)
    with pytest.raises(ValueError, match="same last dimension"):
        theory.kernel_mse(x, torch.zeros(2, 4), num_features=1)
    with pytest.raises(ValueError, match="broadcast"):
        theory.kernel_mse(x, torch.zeros(3, 3), num_features=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        theory.kernel_mse([0.0, 1.0], x, num_features=1)
    with pytest.raises(ValueError, match="y must have shape"):
        theory.kernel_mse(x, torch.tensor(1.0), num_features=1)
    with pytest.raises(ValueError, match="feature_map='trig'.*'positive', 'hyperbolic'"):
        theory.rfa_bias_variance(q, k, v, num_features=4, feature_map="trig")
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        theory.rfa_bias_variance(q, k, v, num_features=0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        theory.rfa_bias_variance(q, k, v, num_features=4, block_size=0)
    with pytest.raises(ValueError, match="q and k must have the same feature size"):
        theory.rfa_bias_variance(q, k[:, :2], v, num_features=4)
    with pytest.raises(ValueError, match="v must have shape"):
        theory.rfa_bias_variance(q, k, v[:3], num_features=4)
    with pytest.raises(ValueError, match="scale must be > 0"):
        theory.rfa_bias_variance(q, k, v, num_features=4, scale=0.0)
