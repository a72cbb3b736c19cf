"""Identities of docs/theory.md section 4, in float64."""
import math

import pytest
import torch

import evalab as ev
from conftest import assert_independent_noise_per_element, make_qkv, scaled

TOL = 1e-10


@pytest.fixture
def case():
    q, k, v = make_qkv(N=9, M=14, d=4, dv=3, batch=(2,), norm=1.0, seed=4)
    draw = ev.RFA(num_features=10).draw(q, k, replicates=3, generator=7)
    return q, k, v, draw


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_shared_coefficient_is_rfa(case, feature_map):
    q, k, v, draw = case
    cv = ev.ControlVariates(num_features=10, coefficient="shared", feature_map=feature_map)
    rfa = ev.RFA(num_features=10, feature_map=feature_map)
    assert (cv(q, k, v, draw) - rfa(q, k, v, draw)).abs().max() < TOL
    assert (ev.ControlVariates(num_features=10, coefficient="chunked", chunk_size=14, feature_map=feature_map)(q, k, v, draw)
            - rfa(q, k, v, draw)).abs().max() < TOL


def test_optimal_coefficient_is_softmax(case):
    q, k, v, draw = case
    exact = ev.softmax_attention(q, k, v)
    for est in (ev.ControlVariates(num_features=10, coefficient="optimal"),
                ev.ControlVariates(num_features=10, coefficient="chunked", chunk_size=1)):
        assert (est(q, k, v, draw) - exact).abs().max() < TOL
        terms = est.terms(q, k, v, draw)
        assert (terms.ghat.sum(-2) - exact).abs().max() < TOL


def test_terms_follow_definitions(case):
    """hbar, E[h], beta and ghat against the formulas of section 4 computed term by term."""
    q, k, v, draw = case
    est = ev.ControlVariates(num_features=10, coefficient="chunked", chunk_size=4)
    t = est.terms(q, k, v, draw)
    x, y, w = scaled(q), scaled(k), draw.noise
    xi_x = torch.exp(x @ w.transpose(-1, -2).unsqueeze(1) - 0.5 * (x * x).sum(-1, keepdim=True))  # (R, b, N, S)
    xi_y = torch.exp(y @ w.transpose(-1, -2).unsqueeze(1) - 0.5 * (y * y).sum(-1, keepdim=True))  # (R, b, M, S)
    logits = x @ y.transpose(-1, -2)
    z = logits.exp().sum(-1, keepdim=True)
    hbar = (xi_x @ xi_y.transpose(-1, -2)) / 10 / z
    assert (t.hbar - hbar).abs().max() < TOL
    assert (t.expected_h - logits.exp() / z).abs().max() < TOL
    gbar = hbar.unsqueeze(-1) * v.unsqueeze(-3)
    for c0 in range(0, 14, 4):
        sl = slice(c0, c0 + 4)
        beta = gbar[..., sl, :].sum(-2) / hbar[..., sl].sum(-1, keepdim=True)
        assert (t.beta[..., sl, :] - beta.unsqueeze(-2)).abs().max() < TOL
    ghat = gbar - t.beta * (hbar - t.expected_h).unsqueeze(-1)
    assert (t.ghat - ghat).abs().max() < TOL
    assert (t.ghat.sum(-2) - est(q, k, v, draw)).abs().max() < TOL


def test_hbar_unbiased():
    """E[hbar_m] = E[h_m] = softmax weight (z-test over 4000 draws, |z| < 4.5: FPR about 7e-6 per entry, 30 entries)."""
    q, k, v = make_qkv(N=5, M=6, d=4, dv=2, norm=0.7, seed=1)
    est = ev.ControlVariates(num_features=4)
    t = est.terms(q, k, v, est.draw(q, k, replicates=4000, generator=3))
    z = (t.hbar.mean(0) - t.expected_h) / (t.hbar.std(0) / math.sqrt(4000))
    assert z.abs().max() < 4.5


def test_chunked_needs_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ev.ControlVariates(coefficient="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        ev.ControlVariates(coefficient="shared", chunk_size=4)
    with pytest.raises(ValueError, match="coefficient='bogus'.*'shared', 'optimal', 'chunked'"):
        ev.ControlVariates(coefficient="bogus")


@pytest.mark.parametrize("coefficient,chunk_size", [("shared", None), ("chunked", 4), ("optimal", None)])
def test_independent_noise_per_batch_element(coefficient, chunk_size):
    q, k, v = make_qkv(N=7, M=9, d=4, dv=3, batch=(2, 3), norm=0.9)
    est = ev.ControlVariates(num_features=5, coefficient=coefficient, chunk_size=chunk_size, shared_noise=False)
    assert_independent_noise_per_element(est, q, k, v)


@pytest.mark.parametrize("N, M, dv, chunk_size, feature_map", [
    (7, 13, 6, 4, "positive"),     # chunks of fewer than dv keys (weight space), the last one padded
    (6, 11, 3, 5, "hyperbolic"),   # chunks in value space, the last one padded
    (5, 4, 6, 3, "positive"),      # fewer keys than dv: the shared coefficient in weight space too
])
def test_key_variance_equals_a_direct_float64_reference(N, M, dv, chunk_size, feature_map):
    """Reference computed the naive way in float64: hbar from the random-feature kernel estimate and Z, every
    chunk's beta by a loop over chunks, ghat (R, *b, N, M, dv) in full, its sample variance over draws."""
    from evalab.estimators.features import kernel_estimate
    from evalab.measure.monte_carlo import iter_draws
    q, k, v = make_qkv(N=N, M=M, d=4, dv=dv, batch=(2,), norm=1.0, seed=3)
    R = 24
    est = ev.ControlVariates(num_features=5, feature_map=feature_map)
    result = ev.key_variance(q, k, v, num_features=5, chunk_size=chunk_size, replicates=R, seed=2,
                             feature_map=feature_map)
    omega = next(iter_draws(est, q, k, R, 2, R))[1].noise
    x, y = q * 4 ** -0.25, k * 4 ** -0.25
    logits = x @ y.transpose(-1, -2)
    z = logits.exp().sum(-1, keepdim=True)
    hbar, expected = kernel_estimate(x, y, omega, feature_map) / z, logits.exp() / z
    for label, size in {"shared": M, f"chunked ({chunk_size})": chunk_size}.items():
        beta = torch.empty(R, 2, N, M, dv, dtype=torch.float64)
        for c in range(0, M, size):
            h = hbar[..., c:c + size]
            beta[..., c:c + size, :] = ((h @ v[..., c:c + size, :]) / h.sum(-1, keepdim=True)).unsqueeze(-2)
        ghat = hbar.unsqueeze(-1) * v.unsqueeze(-3) - beta * (hbar - expected).unsqueeze(-1)
        torch.testing.assert_close(result.variance[label], ghat.var(0).sum(-1), rtol=1e-10, atol=1e-15)
