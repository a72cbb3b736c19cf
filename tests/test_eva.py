"""EVA against a literal reference and the identities of docs/theory.md section 5 (float64, 1e-10)."""
import dataclasses
import itertools

import pytest
import torch

import evalab as ev
from conftest import make_qkv, scaled
from eva_reference import eva_reference
from evalab.estimators.eva import QUERY_BLOCK_ELEMENTS

TOL = 1e-10

CONFIGS = [
    # window, chunk_size, samples_per_chunk; N = 22 pads the official partition's chunks (not a multiple of the
    # window), and (8, 16) and (12, 8) exist for the official partition only
    (8, 4, 1), (8, 4, 3), (6, 2, 2), (0, 5, 1), (0, 5, 2), (12, 12, 1), (10, 0, 1), (4, 1, 1), (8, 16, 1), (12, 8, 2),
]
# proposal, chunk_logit, noise_scale
VARIANTS = [("mean", "mean", 1.0), ("half-mean", "exact", 0.6), ("mean", "official", 4**-0.25), ("zero", "rf", 1.0),
            ("half-mean", "rf", 0.7)]


@pytest.mark.parametrize("window,chunk_size,samples", CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("partition", ["disjoint", "official"])
def test_matches_literal_reference(window, chunk_size, samples, causal, partition, monkeypatch):
    q, k, v = make_qkv(N=22, d=4, dv=3, norm=0.9, seed=11)
    for proposal, chunk_logit, noise_scale in VARIANTS:
        try:
            est = ev.EVA(window=window, chunk_size=chunk_size, samples_per_chunk=samples, proposal=proposal,
                         chunk_logit=chunk_logit, partition=partition, causal=causal, noise_scale=noise_scale)
        except ValueError:  # the only invalid combinations here
            assert (causal and window == 0) or (partition == "disjoint" and window % chunk_size)
            continue
        draw = est.draw(q, k, replicates=1, generator=5)  # replicates: test_official_padding_follows_the_released_rules
        ref = eva_reference(q, k, v, draw.noise, window=window, chunk_size=chunk_size, proposal=proposal,
                            chunk_logit=chunk_logit, partition=partition, causal=causal, noise_scale=noise_scale)
        for query_block in (QUERY_BLOCK_ELEMENTS, 1):  # one block; many, the last one partial (N = 22)
            monkeypatch.setattr(ev.estimators.eva, "QUERY_BLOCK_ELEMENTS", query_block)
            assert (est(q, k, v, draw) - ref).abs().max() < TOL, (proposal, chunk_logit, query_block)


@pytest.mark.parametrize("N,window,chunk_size,chunks", [(21, 8, 2, 12), (5, 8, 2, 4), (20, 12, 8, 3), (13, 8, 16, 1)])
def test_official_padding_follows_the_released_rules(N, window, chunk_size, chunks):
    """Non-causal official partition with N not a multiple of the window: zero-filled positions, chunk means over
    the full chunk length, chunks of padding only kept (logit 0, beta 0), against the literal reference."""
    q, k, v = make_qkv(N=N, d=4, dv=3, batch=(2,), norm=1.2, seed=4)
    for proposal, chunk_logit, noise_scale in VARIANTS:
        est = ev.EVA(window=window, chunk_size=chunk_size, samples_per_chunk=2, proposal=proposal,
                     chunk_logit=chunk_logit, partition="official", noise_scale=noise_scale)
        assert est.num_chunks(k) == chunks
        draw = est.draw(q, k, replicates=2, generator=1)
        out = est(q, k, v, draw)
        for b in range(2):
            ref = eva_reference(q[b], k[b], v[b], draw.noise, window=window, chunk_size=chunk_size, proposal=proposal,
                                chunk_logit=chunk_logit, partition="official", causal=False, noise_scale=noise_scale)
            assert (out[:, b] - ref).abs().max() < TOL, (proposal, chunk_logit)


def test_official_padding_by_hand():
    """N = 3, window 4, chunk 2, S_c = 1, official logit, zero proposal: chunk 0 = keys 0, 1; chunk 1 = key 2 and
    one zero-filled position, mean y_2 / 2; the window holds all three keys."""
    q, k, v = make_qkv(N=3, d=4, dv=2, norm=1.0, seed=2)
    est = ev.EVA(window=4, chunk_size=2, partition="official", chunk_logit="official", proposal="zero")
    draw = est.draw(q, k, replicates=1, generator=0)
    x, y, w = scaled(q), scaled(k), draw.noise[0, :, 0]
    xi0 = torch.exp(y[:2] @ w[0] - 0.5 * (y[:2] ** 2).sum(-1))
    beta = torch.stack([xi0 @ v[:2] / xi0.sum(), v[2]])  # chunk 1 has one real key: its beta is v_2
    for n in range(3):
        logits = torch.cat([x[n] @ y.T, torch.stack([x[n] @ y[:2].mean(0), x[n] @ y[2] / 2])])
        p = torch.softmax(logits, 0)
        assert (est(q, k, v, draw)[0, n] - (p[:3] @ v + p[3:] @ beta)).abs().max() < TOL


def test_defaults_match_the_literal_reference():
    """The defaults (noise_scale, shared noise over a batch of 2, the padding rules) on the configurations once
    recorded from earlier code, against the literal reference on the same draw: the sum of squares and two
    entries to rel 1e-10 (float64; the draw is common to both, so the CPU's sampler does not enter)."""
    q, k, v = make_qkv(N=24, d=4, dv=3, batch=(2,), norm=0.9, seed=7)
    configurations = [
        dict(window=8, chunk_size=4),
        dict(window=8, chunk_size=4, samples_per_chunk=3, proposal="half-mean", chunk_logit="exact"),
        dict(window=6, chunk_size=2, samples_per_chunk=2, causal=True),
        dict(window=0, chunk_size=5, samples_per_chunk=2, proposal="zero", chunk_logit="official"),
        dict(window=8, chunk_size=4, samples_per_chunk=2, partition="official", proposal="half-mean",
             chunk_logit="official"),
        dict(window=8, chunk_size=4, partition="official", causal=True),
    ]
    for kwargs in configurations:
        est = ev.EVA(**kwargs)
        draw = est.draw(q, k, replicates=2, generator=3)
        out = est(q, k, v, draw)
        ref = torch.stack([eva_reference(q[b], k[b], v[b], draw.noise, window=est.window, chunk_size=est.chunk_size,
                                         proposal=est.proposal, chunk_logit=est.chunk_logit, partition=est.partition,
                                         causal=est.causal, noise_scale=est.noise_scale) for b in range(2)], dim=1)
        got = (float((out**2).sum()), float(out[0, 1, 5, 0]), float(out[1, 0, 21, 2]))
        expected = (float((ref**2).sum()), float(ref[0, 1, 5, 0]), float(ref[1, 0, 21, 2]))
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-14), kwargs


@pytest.mark.parametrize("kwargs", [dict(), dict(proposal="half-mean", chunk_logit="official", partition="official"),
                                    dict(proposal="zero", chunk_logit="exact", causal=True),
                                    dict(window=0, chunk_size=3, chunk_logit="rf")])
def test_noise_scale_rescales_eps(kwargs):
    """With S_c = 1 the weights cancel: EVA(noise_scale=s) on eps is EVA() on s * eps."""
    q, k, v = make_qkv(N=20, d=4, dv=3, batch=(2,), norm=1.1)
    kwargs = {"window": 8, "chunk_size": 4, **kwargs}
    for s in (0.5, 4**-0.25, 2.0):
        est = ev.EVA(noise_scale=s, **kwargs)
        draw = est.draw(q, k, replicates=3, generator=2)
        plain = ev.EVA(**kwargs)(q, k, v, ev.Draw(s * draw.noise))
        if kwargs.get("chunk_logit") == "rf":  # the rf mass estimate carries the density ratio's d log s
            assert (est(q, k, v, draw) - plain).abs().max() > 1e-3
        else:
            assert torch.equal(est(q, k, v, draw), plain)


def test_snis_with_noise_scale_is_consistent():
    """With many samples per chunk and the exact chunk logit, EVA tends to softmax attention for any proposal
    scale, because the importance weights use N(mu_c, sigma^2 I). 24 coordinates, each a t-test (31 degrees of
    freedom) of the mean of R = 32 replicates at 5 standard errors (two-sided tail 2.1e-5 each: false-positive
    rate below 6e-4); the O(1/S_c) SNIS bias is far below one standard error at S_c = 2048. sigma = 1.3 keeps
    the weights light-tailed (for sigma^2 <= 1/2 they have infinite variance and no z- or t-test applies).
    Weights that assume sigma = 1 on the same draws (EVA() on sigma * eps) must fail the same test."""
    q, k, v = make_qkv(N=8, d=4, dv=3, norm=1.5, seed=3)
    exact = ev.softmax_attention(q, k, v)
    sigma = 1.3
    est = ev.EVA(window=0, chunk_size=4, samples_per_chunk=2048, chunk_logit="exact", noise_scale=sigma)
    draw = est.draw(q, k, replicates=32, generator=0)

    def t_scores(out):
        return ((out.mean(0) - exact) / (out.std(0) / 32**0.5)).abs()

    assert t_scores(est(q, k, v, draw)).max() < 5
    wrong = ev.EVA(window=0, chunk_size=4, samples_per_chunk=2048, chunk_logit="exact")(q, k, v, ev.Draw(sigma * draw.noise))
    assert t_scores(wrong).max() > 10


@pytest.mark.parametrize("batch", [(3,), (2, 3)])
@pytest.mark.parametrize("kwargs", [dict(), dict(samples_per_chunk=2, proposal="half-mean", noise_scale=0.6),
                                    dict(partition="official", chunk_logit="official", causal=True),
                                    dict(samples_per_chunk=3, chunk_logit="rf", partition="official")])
def test_independent_noise_per_batch_element(batch, kwargs):
    """shared_noise=False: noise (R, *batch, C, S_c, d), and one call equals the calls per batch element on the
    matching noise slices; with the noise equal across elements it equals the shared-noise estimator."""
    q, k, v = make_qkv(N=18, d=4, dv=3, batch=batch, norm=1.1)
    est = ev.EVA(window=8, chunk_size=4, shared_noise=False, **kwargs)
    C = est.num_chunks(k)
    assert est.noise_layout(q, k) == (*batch, C, est.samples_per_chunk, 4)
    draw = est.draw(q, k, replicates=2, generator=0)
    out = est(q, k, v, draw)
    single = ev.EVA(window=8, chunk_size=4, **kwargs)
    for index in itertools.product(*map(range, batch)):
        noise = draw.noise[(slice(None), *index)]
        assert (out[(slice(None), *index)] - single(q[index], k[index], v[index], ev.Draw(noise))).abs().max() < 1e-13
    assert (draw.noise[:, 0] - draw.noise[:, 1]).abs().max() > 0.1  # elements get their own noise
    shared = single.draw(q, k, replicates=2, generator=1)
    expanded = shared.noise.reshape(2, *[1] * len(batch), *shared.noise.shape[1:]).expand(2, *batch, *shared.noise.shape[1:])
    assert (est(q, k, v, ev.Draw(expanded.contiguous())) - single(q, k, v, shared)).abs().max() < 1e-13


@pytest.mark.parametrize("causal", [False, True])
def test_rf_logit_with_shared_draws_is_scatterbrain(causal):
    """Proposal zero, S_c = S, disjoint partition and the same draws for every chunk: EVA with the rf chunk logit
    is [sum_{E_n} e^{l_nm} v_m + sum_{m outside E_n} phi(x_n).phi(y_m) v_m] / [the same without v], for any
    chunk size (outside E_n: the keys outside the window block; causal: the keys before it)."""
    N, S, window = 24, 5, 8
    q, k, v = make_qkv(N=N, d=4, dv=3, norm=1.2, seed=6)
    omega = torch.randn(2, S, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, y = scaled(q), scaled(k)
    for r in range(2):
        phi_x = torch.exp(x @ omega[r].T - 0.5 * (x * x).sum(-1, keepdim=True)) / S**0.5
        phi_y = torch.exp(y @ omega[r].T - 0.5 * (y * y).sum(-1, keepdim=True)) / S**0.5
        expected = torch.empty(N, 3, dtype=torch.float64)
        for n in range(N):
            start = n // window * window
            local = range(start, n + 1) if causal else range(start, start + window)
            rest = range(start) if causal else [m for m in range(N) if m not in local]
            mass = [torch.exp(x[n] @ y[m]) for m in local] + [phi_x[n] @ phi_y[m] for m in rest]
            vals = [v[m] for m in local] + [v[m] for m in rest]
            expected[n] = sum(a * b for a, b in zip(mass, vals)) / sum(mass)
        for chunk_size in (1, 2, 4, 8):
            est = ev.EVA(window=window, chunk_size=chunk_size, samples_per_chunk=S, proposal="zero", chunk_logit="rf",
                         causal=causal)
            noise = omega[r : r + 1].unsqueeze(1).expand(1, N // chunk_size, S, 4)
            assert (est(q, k, v, ev.Draw(noise.contiguous()))[0] - expected).abs().max() < TOL, chunk_size


def test_rf_logit_one_chunk_no_window_is_rfa():
    q, k, v = make_qkv(N=18, d=4, dv=3, batch=(2,), norm=1.2)
    rfa = ev.RFA(num_features=7)
    draw = rfa.draw(q, k, replicates=3, generator=1)
    eva = ev.EVA(window=0, chunk_size=18, samples_per_chunk=7, proposal="zero", chunk_logit="rf")
    assert (eva(q, k, v, ev.Draw(draw.noise.unsqueeze(1))) - rfa(q, k, v, draw)).abs().max() < TOL


def test_monte_carlo_with_independent_noise_and_noise_scale():
    """monte_carlo draws through est.draw: its mse is the mean squared error of the calls on the same noise."""
    from evalab.estimators.draw import seeded_generator

    q, k, v = make_qkv(N=16, d=4, dv=2, batch=(2, 2), norm=1.0)
    est = ev.EVA(window=4, chunk_size=2, samples_per_chunk=2, shared_noise=False, noise_scale=4**-0.25)
    res = ev.monte_carlo(est, q, k, v, replicates=8, seed=3)
    draw = est.draw(q, k, replicates=64, generator=seeded_generator(3, 0))[:8]
    err = ((est(q, k, v, draw) - ev.softmax_attention(q, k, v)) ** 2).sum(-1)
    assert abs(res.metrics["mse"].value - float(err.mean())) < 1e-12
    cmp = ev.compare({"shared": dataclasses.replace(est, shared_noise=True), "own": est}, q, k, v, replicates=8)
    assert not cmp.shared_draws["shared", "own"] and cmp.shared_draws["own", "own"]


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_softmax(causal):
    q, k, v = make_qkv(N=20, d=4, dv=3, batch=(2,), norm=1.5)
    exact = ev.softmax_attention(q, k, v, causal=causal)
    for window, chunk_size in [(20, 4), (24, 4), (64, 8), (20, 0)]:
        est = ev.EVA(window=window, chunk_size=chunk_size, causal=causal)
        out = est(q, k, v, est.draw(q, k, replicates=2, generator=0))
        assert (out - exact).abs().max() < TOL


def test_one_chunk_zero_proposal_is_rfa():
    q, k, v = make_qkv(N=18, d=4, dv=3, batch=(2,), norm=1.2)
    rfa = ev.RFA(num_features=7)
    draw = rfa.draw(q, k, replicates=3, generator=1)
    for chunk_size in (18, 40):
        eva = ev.EVA(window=0, chunk_size=chunk_size, samples_per_chunk=7, proposal="zero", chunk_logit="exact")
        assert (eva(q, k, v, ev.Draw(draw.noise.unsqueeze(1))) - rfa(q, k, v, draw)).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("samples", [1, 3])
def test_unit_chunks_exact_logit_is_softmax(causal, samples):
    q, k, v = make_qkv(N=15, d=4, dv=3, norm=1.5)
    est = ev.EVA(window=0, chunk_size=1, samples_per_chunk=samples, chunk_logit="exact", causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=2, generator=0))
    assert (out - ev.softmax_attention(q, k, v, causal=causal)).abs().max() < TOL


def test_causal_never_looks_ahead():
    q, k, v = make_qkv(N=32, d=4, dv=2, norm=1.0)
    for partition, samples, logit in itertools.product(["disjoint", "official"], [1, 2], ["mean", "rf"]):
        est = ev.EVA(window=8, chunk_size=4, samples_per_chunk=samples, partition=partition, chunk_logit=logit, causal=True)
        draw = est.draw(q, k, replicates=2, generator=3)
        out = est(q, k, v, draw)
        for n in (5, 13, 20):
            k2, v2, q2 = k.clone(), v.clone(), q.clone()
            k2[n + 1 :] += torch.randn_like(k2[n + 1 :])
            q2[n + 1 :] += torch.randn_like(q2[n + 1 :])  # mean proposals use the chunk's queries too
            v2[n + 1 :] = torch.randn_like(v2[n + 1 :])
            assert (est(q2, k2, v2, draw)[:, : n + 1] - out[:, : n + 1]).abs().max() < 1e-12


def test_one_sample_per_chunk_is_query_independent():
    """With S_c = 1 each chunk's beta is the same for every query: two queries that see the same chunks only
    through chunk terms of equal weight get the same value."""
    q, k, v = make_qkv(N=16, d=4, dv=2, norm=1.0)
    est = ev.EVA(window=0, chunk_size=4, chunk_logit="official")
    draw = est.draw(q, k, replicates=1, generator=0)
    q_same = q.clone()
    q_same[:] = 0.0  # all logits zero: every query weighs the four chunks equally
    out = est(q_same, k, v, draw)
    assert (out - out[:, :1]).abs().max() < TOL
    # with real queries: out_n = softmax_c(x_n . mean_c(y)) @ beta, beta_c = softmax_m(w_c . y_m - |y_m|^2 / 2) @ v
    zero = ev.EVA(window=0, chunk_size=4, chunk_logit="official", proposal="zero")
    x, y = scaled(q), scaled(k)
    w = draw.noise[0, :, 0]  # (C, d)
    log_xi = (y.view(4, 4, -1) * w.unsqueeze(1)).sum(-1) - 0.5 * (y.view(4, 4, -1) ** 2).sum(-1)  # (C, L)
    beta = torch.einsum("cl,clv->cv", torch.softmax(log_xi, -1), v.view(4, 4, -1))
    ref = torch.softmax(x @ y.view(4, 4, -1).mean(1).T, -1) @ beta
    assert (zero(q, k, v, draw)[0] - ref).abs().max() < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_finite_at_norm_10(dtype):
    q, k, v = make_qkv(N=64, d=16, dv=4, norm=10.0, dtype=dtype)
    for est in (ev.EVA(window=16, chunk_size=4), ev.EVA(window=16, chunk_size=4, samples_per_chunk=4, proposal="zero"),
                ev.EVA(window=16, chunk_size=4, samples_per_chunk=3, chunk_logit="rf", noise_scale=0.5, shared_noise=False)):
        draw = est.draw(q, k, replicates=2, generator=0)
        out = est(q, k, v, draw)
        assert out.dtype == dtype and torch.isfinite(out).all()
        exact = est(q.double(), k.double(), v.double(), draw)  # the same rounded inputs in float64
        assert (out.double() - exact).abs().max() < (1e-4 if dtype == torch.float32 else 1e-2)


def test_noise_layout():
    q, k, v = make_qkv(N=21, d=4)
    est = ev.EVA(window=8, chunk_size=4, samples_per_chunk=3)
    assert est.noise_layout(q, k) == (6, 3, 4)
    assert est.draw(q, k, replicates=5, generator=0).noise.shape == (5, 6, 3, 4)
    assert ev.EVA(window=8, chunk_size=0).noise_layout(q, k) == (0, 1, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=6, chunk_size=4), "window=6 must be a multiple of chunk_size=4 with partition='disjoint': it drops the chunks inside"),
        (dict(window=0, chunk_size=0), "nothing to attend"),
        (dict(window=-1), "window must be >= 0"),
        (dict(samples_per_chunk=0), "samples_per_chunk must be >= 1"),
        (dict(proposal="median"), "proposal='median'.*'zero', 'mean', 'half-mean'"),
        (dict(chunk_logit="max"), "chunk_logit='max'.*'exact', 'mean', 'official', 'rf'"),
        (dict(noise_scale=0.0), "noise_scale must be > 0"),
        (dict(shared_noise=1), "shared_noise must be a bool"),
        (dict(partition="overlap"), "partition='overlap'.*'disjoint', 'official'"),
        (dict(window=0, chunk_size=4, causal=True), "causal EVA with window=0"),
        (dict(window=8.0), "window must be an int"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ev.EVA(**kwargs)


def test_lengths_must_match_with_window_or_mean_proposal():
    q, k, v = make_qkv(N=8, M=12)
    with pytest.raises(ValueError, match="window=4 needs self-attention"):
        est = ev.EVA(window=4, chunk_size=2)
        est(q, k, v, est.draw(q, k, generator=0))
    with pytest.raises(ValueError, match="proposal='mean'"):
        est = ev.EVA(window=0, chunk_size=4)
        est(q, k, v, est.draw(q, k, generator=0))
    est = ev.EVA(window=0, chunk_size=4, proposal="zero")  # cross-attention without a window is fine
    assert est(q, k, v, est.draw(q, k, generator=0)).shape == (1, 8, 3)
