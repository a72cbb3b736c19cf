"""EVA against a literal reference and the identities of theory.md section 5 (float64, 1e-10)."""
import itertools

import pytest
import torch

import evalab as ev
from conftest import make_qkv, scaled
from eva_reference import eva_reference

TOL = 1e-10

CONFIGS = [
    # window, chunk_size, samples_per_chunk
    (8, 4, 1), (8, 4, 3), (6, 2, 2), (0, 5, 1), (0, 5, 2), (12, 12, 1), (10, 0, 1), (4, 1, 1),
]


@pytest.mark.parametrize("window,chunk_size,samples", CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("partition", ["disjoint", "official"])
@pytest.mark.parametrize("query_block", [None, 1], ids=["one-block", "block-per-group"])
def test_matches_literal_reference(window, chunk_size, samples, causal, partition, query_block, monkeypatch):
    if query_block is not None:  # force many query blocks, the last one partial (N = 22)
        monkeypatch.setattr(ev.estimators.eva, "QUERY_BLOCK_ELEMENTS", query_block)
    q, k, v = make_qkv(N=22, d=4, dv=3, norm=0.9, seed=11)
    for proposal, chunk_logit in [("mean", "mean"), ("half-mean", "exact"), ("zero", "official")]:
        try:
            est = ev.EVA(window=window, chunk_size=chunk_size, samples_per_chunk=samples, proposal=proposal,
                         chunk_logit=chunk_logit, partition=partition, causal=causal)
        except ValueError:
            assert causal and window == 0  # the only invalid combinations here
            continue
        draw = est.draw(q, k, replicates=2, generator=5)
        out = est(q, k, v, draw)
        ref = eva_reference(q, k, v, draw.noise, window=window, chunk_size=chunk_size, proposal=proposal,
                            chunk_logit=chunk_logit, partition=partition, causal=causal)
        assert (out - ref).abs().max() < TOL, (proposal, chunk_logit)


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
    for partition, samples in itertools.product(["disjoint", "official"], [1, 2]):
        est = ev.EVA(window=8, chunk_size=4, samples_per_chunk=samples, partition=partition, causal=True)
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
    for est in (ev.EVA(window=16, chunk_size=4), ev.EVA(window=16, chunk_size=4, samples_per_chunk=4, proposal="zero")):
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
        (dict(window=6, chunk_size=4), "window=6 must be a multiple of chunk_size=4"),
        (dict(window=0, chunk_size=0), "nothing to attend"),
        (dict(window=-1), "window must be >= 0"),
        (dict(samples_per_chunk=0), "samples_per_chunk must be >= 1"),
        (dict(proposal="median"), "proposal='median'.*'zero', 'mean', 'half-mean'"),
        (dict(chunk_logit="max"), "chunk_logit='max'.*'exact', 'mean', 'official'"),
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
