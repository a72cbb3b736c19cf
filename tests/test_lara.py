"""LARA against a literal per-query loop (float64, 1e-10), the identities of docs/theory.md section 10 (zero
proposals with the balance heuristic are RFA; balance is optimal with alpha = 0; one proposal is
query-independent), its cost against torch's FLOP counter, and the noise conventions."""
import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import assert_independent_noise_per_element, make_qkv
from evalab.estimators.lara import segment_means

TOL = 1e-10


def segments(N, C):
    """The reference code's split of N positions into min(C, N) contiguous segments (lists of positions)."""
    C = min(C, N)
    L = N // C
    sizes = [L] * C if N % C == 0 else [L] * ((L + 1) * C - N) + [L + 1] * (N - L * C)
    starts = [sum(sizes[:c]) for c in range(C)]
    return [list(range(a, a + size)) for a, size in zip(starts, sizes)]


def lara_reference(q, k, v, noise, *, weights, alpha, proposal, antithetic, sigma, floor=1e-8, repeats=1):
    """q, k (N, d), v (N, dv), noise (R, C, S_c, d) -> (R, N, dv), one query and one sample at a time, with the
    densities written out: p_n(w) Z_n = N(w; 0, I) xi(x_n, w) sum_m xi(y_m, w), q_c = N(w; mu_c, sigma^2 I).
    The optimal weights clamp at ``floor``; ``repeats`` > 1 takes their balance-heuristic term over the proposal
    list repeated that many times (the released code's convention with two samples per proposal)."""
    N, d = q.shape
    x, y = q * d**-0.25, k * d**-0.25
    R, C, S, _ = noise.shape
    segs = segments(N, C)
    zero = torch.zeros(d, dtype=torch.float64)
    mus = [x[g].mean(0) + y[g].mean(0) for g in segs] if proposal == "mean" else [zero] * C

    def log_normal(w, mean, sd):
        return float(-((w - mean) @ (w - mean)) / (2 * sd**2) - d * math.log(sd) - d / 2 * math.log(2 * math.pi))

    def log_xi(a, w):
        return float(w @ a - a @ a / 2)

    t_logits = [[float(x[g].mean(0) @ x[m]) for m in range(N)] for g in segs]  # softmax over the queries m
    t = torch.softmax(torch.tensor(t_logits, dtype=torch.float64), 1)
    out = torch.zeros(R, N, v.shape[1], dtype=torch.float64)
    for r in range(R):
        samples = []
        for c in range(C):
            for s in range(S):
                samples.append((c, mus[c] + sigma * noise[r, c, s]))
                if antithetic:
                    samples.append((c, mus[c] - sigma * noise[r, c, s]))
        f, log_mass, log_q = [], [], []  # per sample: f(w), log sum_m xi(y_m, w), log q_j(w) for every j
        for c, w in samples:
            key_logits = torch.tensor([log_xi(y[m], w) for m in range(k.shape[0])], dtype=torch.float64)
            f.append(torch.softmax(key_logits, 0) @ v)
            log_mass.append(float(torch.logsumexp(key_logits, 0)))
            log_q.append([log_normal(w, mus[j], sigma) for j in range(C)])
        for n in range(N):
            log_weights = []
            for i, (c, w) in enumerate(samples):
                log_p = log_normal(w, zero, 1.0) + log_xi(x[n], w) + log_mass[i]
                mixture = math.log(sum(math.exp(a) for a in log_q[i]))
                if weights == "balance":
                    log_weights.append(log_p - mixture)
                else:
                    listed = log_q[i] * repeats  # the proposal list, repeated
                    bh = math.exp(log_q[i][c]) / sum(math.exp(a) for a in listed)
                    t_mean = sum(float(t[j % C, n]) for j in range(len(listed))) / len(listed)
                    a = bh + alpha * (float(t[c, n]) - t_mean)
                    log_weights.append(log_p - log_q[i][c] + math.log(max(a, floor)))
            p = torch.softmax(torch.tensor(log_weights, dtype=torch.float64), 0)
            out[r, n] = p @ torch.stack(f)
    return out


@pytest.mark.parametrize("N,C", [(10, 3), (12, 4), (7, 7), (5, 8)], ids=["uneven", "even", "one-per-token", "N<C"])
@pytest.mark.parametrize("weights,alpha", [("balance", 1.0), ("optimal", 1.5), ("optimal", 40.0)])
def test_matches_per_query_loop(N, C, weights, alpha):
    # alpha = 40 drives some weights below zero, so the 1e-8 clamp is exercised
    q, k, v = make_qkv(N=N, d=4, dv=3, batch=(2,), norm=1.0, seed=3)
    configs = [("mean", False, 1, 1.0), ("mean", True, 2, 0.6), ("zero", False, 2, 1.0), ("zero", True, 1, 0.6)]
    for proposal, antithetic, samples, sigma in configs:
        est = ev.LARA(num_proposals=C, samples_per_proposal=samples, weights=weights, alpha=alpha, proposal=proposal,
                      antithetic=antithetic, noise_scale=sigma)
        if weights == "optimal" and proposal == "zero" and N < C:
            with pytest.raises(ValueError, match="optimal"):
                est(q, k, v, est.draw(q, k, generator=0))
            continue
        draw = est.draw(q, k, replicates=2, generator=1)
        out = est(q, k, v, draw)
        for b in range(2):
            ref = lara_reference(q[b], k[b], v[b], draw.noise, weights=weights, alpha=alpha, proposal=proposal,
                                 antithetic=antithetic, sigma=sigma)
            assert (out[:, b] - ref).abs().max() < TOL, (proposal, antithetic, samples, sigma)


@pytest.mark.parametrize("samples,antithetic", [(2, False), (1, True)], ids=["two-samples", "antithetic"])
def test_released_optimal_weights_are_alpha_doubled_with_the_floor_at_2e_8(samples, antithetic):
    """The released code's optimal weights (BH over the proposal list repeated per sample, clamp 1e-8) equal
    weights="optimal" with alpha doubled and alpha_floor=2e-8; alpha = 40 makes some weights clamp, where the
    default floor gives another estimator."""
    q, k, v = make_qkv(N=10, d=4, dv=3, batch=(2,), norm=1.0, seed=3)
    alpha = 40.0
    est = ev.LARA(num_proposals=3, samples_per_proposal=samples, weights="optimal", alpha=2 * alpha,
                  alpha_floor=2e-8, antithetic=antithetic)
    draw = est.draw(q, k, replicates=2, generator=1)
    out = est(q, k, v, draw)
    default_floor = dataclasses.replace(est, alpha_floor=1e-8)(q, k, v, draw)
    for b in range(2):
        released = lara_reference(q[b], k[b], v[b], draw.noise, weights="optimal", alpha=alpha, proposal="mean",
                                  antithetic=antithetic, sigma=1.0, repeats=2)
        assert (out[:, b] - released).abs().max() < TOL
        assert (default_floor[:, b] - released).abs().max() > 10 * TOL
    with pytest.raises(ValueError, match="alpha_floor must be > 0.0, got 0.0"):
        ev.LARA(alpha_floor=0.0)


def test_segments_follow_the_reference_split():
    t = torch.arange(10, dtype=torch.float64).unsqueeze(-1)  # N = 10, C = 4: L = 2, sizes 2, 2, 3, 3
    assert segment_means(t, 4).flatten().tolist() == pytest.approx([0.5, 2.5, 5.0, 8.0], rel=1e-15)
    assert segment_means(t, 5).flatten().tolist() == pytest.approx([0.5, 2.5, 4.5, 6.5, 8.5], rel=1e-15)
    assert segment_means(t, 10).flatten().tolist() == list(map(float, range(10)))


@pytest.mark.parametrize("samples,antithetic", [(1, False), (3, False), (2, True)])
def test_zero_proposals_with_balance_are_rfa(samples, antithetic):
    # mu_c = 0 and sigma = 1: every proposal is N(0, I), the mixture weights are constant and LARA is RFA with
    # omega = eps, C S_c draws (antithetic: hyperbolic features, the pairs +-eps)
    q, k, v = make_qkv(N=11, M=9, d=4, dv=3, batch=(2,), norm=1.3)
    lara = ev.LARA(num_proposals=5, samples_per_proposal=samples, proposal="zero", antithetic=antithetic)
    draw = lara.draw(q, k, replicates=3, generator=2)
    rfa = ev.RFA(num_features=5 * samples, feature_map="hyperbolic" if antithetic else "positive")
    assert (lara(q, k, v, draw) - rfa(q, k, v, ev.Draw(draw.noise.flatten(1, 2)))).abs().max() < TOL


@pytest.mark.parametrize("proposal", ["mean", "zero"])
@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_balance_is_optimal_with_alpha_zero(proposal, sigma):
    # (where every balance-heuristic weight stays above the 1e-8 clamp, as here at norm 1)
    q, k, v = make_qkv(N=16, d=4, dv=3, batch=(2,), norm=1.0)
    balance = ev.LARA(num_proposals=4, samples_per_proposal=2, proposal=proposal, noise_scale=sigma)
    optimal = ev.LARA(num_proposals=4, samples_per_proposal=2, weights="optimal", alpha=0.0, proposal=proposal,
                      noise_scale=sigma)
    draw = balance.draw(q, k, replicates=3, generator=4)
    assert (balance(q, k, v, draw) - optimal(q, k, v, draw)).abs().max() < TOL


@pytest.mark.parametrize("weights", ["balance", "optimal"])
def test_one_proposal_is_query_independent(weights):
    q, k, v = make_qkv(N=9, d=4, dv=3, norm=1.4)
    est = ev.LARA(num_proposals=1, weights=weights, noise_scale=0.7)
    draw = est.draw(q, k, replicates=2, generator=6)
    out = est(q, k, v, draw)
    x, y = q * 4**-0.25, k * 4**-0.25
    omega = x.mean(0) + y.mean(0) + 0.7 * draw.noise[:, 0, 0]  # (R, d)
    f = torch.softmax(omega @ y.T - 0.5 * (y * y).sum(-1), -1) @ v  # (R, dv)
    assert (out - f.unsqueeze(1)).abs().max() < TOL


@pytest.mark.parametrize("weights,proposal", [("balance", "mean"), ("optimal", "mean"), ("balance", "zero")])
@pytest.mark.parametrize("antithetic", [False, True])
def test_finite_in_float32_at_norm_10(weights, proposal, antithetic):
    q, k, v = make_qkv(N=40, d=8, dv=4, batch=(2,), norm=10.0, dtype=torch.float32)
    for sigma in (1.0, 8**-0.25):
        est = ev.LARA(num_proposals=8, samples_per_proposal=2, weights=weights, proposal=proposal,
                      antithetic=antithetic, noise_scale=sigma)
        out = est(q, k, v, est.draw(q, k, replicates=3, generator=0))
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        # a convex combination of f's, each a convex combination of the values
        assert bool((out <= v.amax(-2, keepdim=True) + 1e-4).all() and (out >= v.amin(-2, keepdim=True) - 1e-4).all())


@pytest.mark.parametrize("weights", ["balance", "optimal"])
def test_independent_noise_is_per_element_calls(weights):
    q, k, v = make_qkv(N=10, d=4, dv=2, batch=(2, 3), norm=1.0)
    own = ev.LARA(num_proposals=3, samples_per_proposal=2, weights=weights, antithetic=True, shared_noise=False)
    assert own.noise_layout(q, k) == (2, 3, 3, 2, 4)
    assert_independent_noise_per_element(own, q, k, v, tol=TOL)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_cost_matches_flop_counter(batch):
    # FlopCounterMode counts the matrix products; cost() adds the elementwise terms its docstring lists
    N = M = 64
    d = dv = 16
    q, k, v = make_qkv(N=N, d=d, dv=dv, batch=batch, dtype=torch.float32)
    b = math.prod(batch)
    for C, S, weights, proposal, antithetic in [(8, 1, "balance", "mean", False), (8, 2, "optimal", "mean", True),
                                                (100, 1, "balance", "zero", True), (8, 2, "optimal", "zero", False),
                                                (100, 1, "optimal", "mean", False)]:  # C > N: one proposal per token
        est = ev.LARA(num_proposals=C, samples_per_proposal=S, weights=weights, proposal=proposal,
                      antithetic=antithetic)
        C_used = min(C, N) if proposal == "mean" else C
        K = C_used * S * (2 if antithetic else 1)
        optimal = weights == "optimal"
        for R in (1, 3):
            draw = est.draw(q, k, replicates=R, generator=0)
            with FlopCounterMode(display=False) as counter:
                est(q, k, v, draw)
            products = R * (2 * K * (M + N) * (d + dv) + 2 * K * C_used * d) + (2 * C_used * N * d if optimal else 0)
            products *= b
            assert counter.get_total_flops() == products
            means = (N + M) * d if proposal == "mean" else N * d if optimal else 0
            elementwise = 3 * C_used**2 * d + means + (6 * N * C_used if optimal else 0)
            elementwise += R * (6 * K * d + 5 * K * M + 6 * K * C_used + 5 * N * K + (4 * N * K if optimal else 0))
            assert est.cost(N=N, M=M, d=d, dv=dv, batch=b).flops(R) == products + b * elementwise


def test_monte_carlo_and_registry():
    q, k, v = make_qkv(N=16, d=4, dv=2, norm=1.0)
    est = ev.registry.make_estimator("lara", num_proposals=4, weights="optimal")
    assert ev.registry.estimator_name(est) == "lara"
    res = ev.monte_carlo(est, q, k, v, replicates=64, seed=0)
    assert res.mse.value >= 0 and math.isfinite(res.mse.value)


def test_errors():
    with pytest.raises(ValueError, match="causal"):
        ev.LARA(causal=True)
    with pytest.raises(ValueError, match="weights"):
        ev.LARA(weights="mis-bh")
    with pytest.raises(ValueError, match="proposal"):
        ev.LARA(proposal="pool")
    with pytest.raises(ValueError, match="noise_scale"):
        ev.LARA(noise_scale=0.0)
    with pytest.raises(ValueError, match="num_proposals"):
        ev.LARA(num_proposals=0)
    q, k, v = make_qkv(N=6, M=8, d=4, dv=2)
    est = ev.LARA(num_proposals=2)
    with pytest.raises(ValueError, match="N == M"):
        est(q, k, v, ev.Draw(torch.zeros(1, 2, 1, 4)))
    zero = ev.LARA(num_proposals=2, proposal="zero")
    assert zero(q, k, v, zero.draw(q, k, generator=0)).shape == (1, 6, 2)  # cross-attention with zero proposals
    with pytest.raises(ValueError, match="expected"):
        zero(q, k, v, ev.Draw(torch.zeros(1, 3, 1, 4)))
