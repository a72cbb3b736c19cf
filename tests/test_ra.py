"""RA against a literal per-query loop (float64, 1e-10), its unbiasedness (Monte Carlo), its cost against
torch's FLOP counter, and the noise conventions (docs/theory.md section 10)."""
import math

import pytest
import torch
from scipy.stats import norm
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import assert_independent_noise_per_element, make_qkv
from evalab.estimators.ra import _sample_keys

TOL = 1e-10


def ra_reference(q, k, v, noise, *, sigma, causal):
    """q, k (N, d), v (N, dv), noise (R, N, S, d + 1) -> (R, N, dv): one query and one sample at a time."""
    N, d = q.shape
    x, y = q * d**-0.25, k * d**-0.25
    R, _, S, _ = noise.shape
    out = torch.zeros(R, N, v.shape[1], dtype=torch.float64)
    for r in range(R):
        for n in range(N):
            keys = list(range(n + 1)) if causal else list(range(k.shape[0]))
            pi = [math.exp(float(x[n] @ y[m])) for m in keys]
            for s in range(S):
                eps, u = noise[r, n, s, :-1], float(noise[r, n, s, -1])
                total, m = 0.0, None  # inverse CDF: the first key whose cumulative probability exceeds u
                for j, p in zip(keys, pi):
                    total += p / sum(pi)
                    if total > u:
                        m = j
                        break
                omega = x[n] + y[m] + sigma * eps
                logits = torch.stack([omega @ y[j] - 0.5 * y[j] @ y[j] for j in keys])
                out[r, n] += torch.softmax(logits, 0) @ v[keys] / S
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("samples,sigma", [(1, 1.0), (3, 1.0), (2, 0.6)])
@pytest.mark.parametrize("block", [None, 1], ids=["one-block", "many-blocks"])
def test_matches_per_query_loop(causal, samples, sigma, block, monkeypatch):
    if block is not None:  # one query per block
        monkeypatch.setattr(ev.estimators.ra, "BLOCK_ELEMENTS", block)
    q, k, v = make_qkv(N=9, d=4, dv=3, batch=(2,), norm=1.2, seed=4)
    est = ev.RA(samples_per_query=samples, noise_scale=sigma, causal=causal)
    draw = est.draw(q, k, replicates=2, generator=7)
    out = est(q, k, v, draw)
    assert out.shape == (2, 2, 9, 3)
    for b in range(2):
        ref = ra_reference(q[b], k[b], v[b], draw.noise, sigma=sigma, causal=causal)
        assert (out[:, b] - ref).abs().max() < TOL


def test_cross_attention_matches_loop():
    q, k, v = make_qkv(N=5, M=11, d=4, dv=2, norm=1.0, seed=2)
    est = ev.RA(samples_per_query=2)
    draw = est.draw(q, k, replicates=3, generator=1)
    assert (est(q, k, v, draw) - ra_reference(q, k, v, draw.noise, sigma=1.0, causal=False)).abs().max() < TOL


def test_noise_scale_scales_the_normals():
    q, k, v = make_qkv(N=8, d=4, dv=2, batch=(2,), norm=1.0)
    est = ev.RA(samples_per_query=3)
    noise = est.draw(q, k, replicates=2, generator=3).noise
    scaled = torch.cat([0.3 * noise[..., :-1], noise[..., -1:]], dim=-1)
    out = ev.RA(samples_per_query=3, noise_scale=0.3)(q, k, v, ev.Draw(noise))
    assert (out - est(q, k, v, ev.Draw(scaled))).abs().max() < TOL


def test_inverse_cdf_follows_the_softmax_row():
    # u on a regular grid of G points: each key is chosen for a share of the grid within 1/G of its probability
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    G = 10_000
    u = ((torch.arange(G, dtype=torch.float64) + 0.5) / G).expand(3, G)
    index = _sample_keys(logits, u.unsqueeze(0), None)[0]
    share = torch.stack([torch.bincount(row, minlength=7) for row in index]) / G
    assert (share - torch.softmax(logits, -1)).abs().max() <= 1 / G
    # a uniform that rounds up to the total mass never picks a key of zero mass (masked or underflowed)
    ahead = torch.arange(7) > torch.arange(3).unsqueeze(-1)
    top = _sample_keys(logits, torch.ones(1, 3, 1, dtype=torch.float64), ahead)
    assert top.flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("causal", [False, True])
def test_unbiased_monte_carlo(causal):
    # With S = 1 every replicate is an independent exact sample of p_n, so the mean of R replicates is Y_n up to
    # sampling error. z test per query and value channel, Bonferroni over the N dv = 12 tests at a family-wise
    # level of 1e-3: under unbiasedness a fresh seed fails with probability <= 1e-3 (normal approximation;
    # R = 20000 of bounded variables). Fixed seed, so the outcome is deterministic.
    q, k, v = make_qkv(N=6, d=4, dv=2, norm=1.5, seed=8)
    est = ev.RA(samples_per_query=1, causal=causal)
    R = 20_000
    out = est(q, k, v, est.draw(q, k, replicates=R, generator=11))
    error = (out.mean(0) - ev.softmax_attention(q, k, v, causal=causal)).abs()
    # (causal query 0 sees one key: its output is exact, standard error 0)
    assert bool((error <= norm.ppf(1 - 1e-3 / (2 * error.numel())) * out.std(0) / math.sqrt(R) + 1e-12).all())


def test_reference_code_noise_scale_is_biased():
    # sigma = d ** -0.25 (the reference code's raw-coordinate noise) samples a narrower density than p_n: the
    # same z test rejects unbiasedness by a wide margin (|z| > 10, where the Bonferroni bound is 3.9)
    q, k, v = make_qkv(N=6, d=4, dv=2, norm=1.5, seed=8)
    est = ev.RA(samples_per_query=1, noise_scale=4**-0.25)
    R = 20_000
    out = est(q, k, v, est.draw(q, k, replicates=R, generator=11))
    z = (out.mean(0) - ev.softmax_attention(q, k, v)) / (out.std(0) / math.sqrt(R))
    assert z.abs().max() > 10


@pytest.mark.parametrize("causal", [False, True])
def test_finite_in_float32_at_norm_10(causal):
    q, k, v = make_qkv(N=24, d=8, dv=4, batch=(2,), norm=10.0, dtype=torch.float32)
    est = ev.RA(samples_per_query=4, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=3, generator=0))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    # every f is a convex combination of the values
    assert bool((out <= v.amax(-2, keepdim=True) + 1e-4).all() and (out >= v.amin(-2, keepdim=True) - 1e-4).all())


@pytest.mark.parametrize("causal", [False, True])
def test_independent_noise_is_per_element_calls(causal):
    q, k, v = make_qkv(N=7, d=4, dv=2, batch=(2, 3), norm=1.0)
    own = ev.RA(samples_per_query=2, causal=causal, shared_noise=False)
    assert own.noise_layout(q, k) == (2, 3, 7, 2, 5)
    assert_independent_noise_per_element(own, q, k, v, tol=TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_cost_matches_flop_counter(causal, batch):
    # FlopCounterMode counts the matrix products; cost() adds the elementwise terms its docstring lists
    N = M = 64
    d = dv = 16
    q, k, v = make_qkv(N=N, d=d, dv=dv, batch=batch, dtype=torch.float32)
    b = math.prod(batch)
    for S in (1, 8):
        est = ev.RA(samples_per_query=S, causal=causal)
        for R in (1, 3):
            draw = est.draw(q, k, replicates=R, generator=0)
            with FlopCounterMode(display=False) as counter:
                est(q, k, v, draw)
            products = b * (2 * N * M * d + R * 2 * N * S * M * (d + dv))
            elementwise = b * (3 * N * M + R * (2 * N * S * d + 5 * N * S * M + N * S * dv))
            assert counter.get_total_flops() == products
            assert est.cost(N=N, M=M, d=d, dv=dv, batch=b).flops(R) == products + elementwise


def test_monte_carlo_and_registry():
    q, k, v = make_qkv(N=8, d=4, dv=2, norm=1.0)
    est = ev.registry.make_estimator("ra", samples_per_query=4)
    assert ev.registry.estimator_name(est) == "ra"
    res = ev.monte_carlo(est, q, k, v, replicates=64, seed=0)
    out = est(q, k, v, est.draw(q, k, replicates=64, generator=0))
    assert res.mse.value >= 0 and math.isfinite(res.mse.value)
    assert out.shape == (64, 8, 2)


def test_errors():
    q, k, v = make_qkv(N=6, M=8, d=4, dv=2)
    with pytest.raises(ValueError, match="samples_per_query"):
        ev.RA(samples_per_query=0)
    with pytest.raises(ValueError, match="noise_scale"):
        ev.RA(noise_scale=-1.0)
    est = ev.RA(causal=True)
    with pytest.raises(ValueError, match="causal"):
        est(q, k, v, ev.Draw(torch.zeros(1, 6, 16, 5)))
    est = ev.RA(samples_per_query=2)
    with pytest.raises(ValueError, match="expected"):
        est(q, k, v, ev.Draw(torch.zeros(1, 6, 2, 4)))  # no uniform channel
    with pytest.raises(ValueError, match="ra:uniform"):
        est(q, k, v, ev.Draw(torch.zeros(1, 6, 2, 5), "eps"))
