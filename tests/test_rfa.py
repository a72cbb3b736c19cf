
import pytest
import torch

import evalab as ev
from conftest import assert_independent_noise_per_element, make_qkv, scaled
from evalab.estimators.features import kernel_estimate
from evalab.estimators.rfa import CAUSAL_BLOCK

MAPS = ["positive", "hyperbolic", "trig"]


def rfa_reference(q, k, v, omega, feature_map, causal=False):
    """Literal SNIS ratio from the kernel estimate (float64, quadratic)."""
    kern = kernel_estimate(scaled(q), scaled(k), omega, feature_map)
    if causal:
        kern = kern.tril()
    return (kern @ v) / kern.sum(-1, keepdim=True)


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("log_block", [None, 200], ids=["one-block", "position-blocks"])
def test_matches_reference(feature_map, causal, log_block, monkeypatch):
    if log_block is not None:  # non-causal log space over blocks of 1-2 positions
        monkeypatch.setattr(ev.estimators.rfa, "LOG_BLOCK_ELEMENTS", log_block)
    N = 2 * CAUSAL_BLOCK + 5  # several causal blocks and a partial one
    q, k, v = make_qkv(N=N, d=6, dv=3, batch=(2,), norm=0.8)
    est = ev.RFA(num_features=12, feature_map=feature_map, causal=causal)
    draw = est.draw(q, k, replicates=3, generator=0)
    out = est(q, k, v, draw)
    assert out.shape == (3, 2, N, 3)
    assert (out - rfa_reference(q, k, v, draw.noise, feature_map, causal)).abs().max() < 1e-10


@pytest.mark.parametrize("feature_map", MAPS)
def test_causal_never_looks_ahead(feature_map):
    q, k, v = make_qkv(N=70, d=4, dv=2, norm=0.8)
    est = ev.RFA(num_features=8, feature_map=feature_map, causal=True)
    draw = est.draw(q, k, replicates=2, generator=1)
    out = est(q, k, v, draw)
    n = 40
    k2, v2 = k.clone(), v.clone()
    k2[n + 1 :] = 5 * torch.randn_like(k2[n + 1 :])
    v2[n + 1 :] = torch.randn_like(v2[n + 1 :])
    out2 = est(q, k2, v2, draw)
    assert (out[:, : n + 1] - out2[:, : n + 1]).abs().max() < 1e-12
    assert (out[:, n + 1 :] - out2[:, n + 1 :]).abs().max() > 1e-3


def test_eps_reproduces_performer_constants():
    """eps > 0: phi = exp(w.x - |x|^2/2 - max w.x) + eps, the max per query row and over all keys and features."""
    q, k, v = make_qkv(N=10, M=13, d=4, dv=3, norm=1.0)
    est = ev.RFA(num_features=6, eps=1e-3)
    draw = est.draw(q, k, replicates=2, generator=2)
    w = draw.noise
    pq, pk = scaled(q) @ w.transpose(-1, -2), scaled(k) @ w.transpose(-1, -2)
    qf = torch.exp(pq - 0.5 * (scaled(q) ** 2).sum(-1, keepdim=True) - pq.amax(-1, keepdim=True)) + 1e-3
    kf = torch.exp(pk - 0.5 * (scaled(k) ** 2).sum(-1, keepdim=True) - pk.amax((-2, -1), keepdim=True)) + 1e-3
    ref = (qf @ (kf.transpose(-1, -2) @ v)) / (qf @ kf.sum(-2, keepdim=True).transpose(-1, -2))
    assert (est(q, k, v, draw) - ref).abs().max() < 1e-12
    assert (ev.RFA(num_features=6)(q, k, v, draw) - ref).abs().max() > 1e-6  # eps changes the estimator
    # causal: each key is stabilised by its own max, so the prefix ratio uses only past keys
    causal = ev.RFA(num_features=6, eps=1e-3, causal=True)
    q2, k2, v2 = make_qkv(N=40, d=4, dv=3, norm=1.0)
    pq, pk = scaled(q2) @ w.transpose(-1, -2), scaled(k2) @ w.transpose(-1, -2)
    qf = torch.exp(pq - 0.5 * (scaled(q2) ** 2).sum(-1, keepdim=True) - pq.amax(-1, keepdim=True)) + 1e-3
    kf = torch.exp(pk - 0.5 * (scaled(k2) ** 2).sum(-1, keepdim=True) - pk.amax(-1, keepdim=True)) + 1e-3
    kern = (qf @ kf.transpose(-1, -2)).tril()
    ref = (kern @ v2) / kern.sum(-1, keepdim=True)
    assert (causal(q2, k2, v2, draw) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_float32_finite_at_norm_10(causal, feature_map):
    q, k, v = make_qkv(N=80, d=16, dv=4, norm=10.0, dtype=torch.float32)
    est = ev.RFA(num_features=64, feature_map=feature_map, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=4, generator=0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # convex combination of the values
    assert (out <= v.amax(-2) + 1e-4).all() and (out >= v.amin(-2) - 1e-4).all()


def test_float32_matches_float64_at_norm_10():
    q, k, v = make_qkv(N=40, d=16, dv=4, norm=10.0)
    est = ev.RFA(num_features=64)
    draw = est.draw(q, k, replicates=2, generator=0)
    exact = est(q, k, v, draw)
    single = est(q.float(), k.float(), v.float(), draw)
    assert (single.double() - exact).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_close_to_float32(dtype):
    q, k, v = make_qkv(N=30, d=8, dv=4, norm=1.0, dtype=torch.float32)
    est = ev.RFA(num_features=32)
    draw = est.draw(q, k, replicates=2, generator=0)
    half = est(q.to(dtype), k.to(dtype), v.to(dtype), draw)
    assert half.dtype == dtype
    full = est(q, k, v, draw)
    # precision floor: the same estimator fed the rounded inputs, computed in float32, then rounded to dtype
    rounded = est(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), draw)
    assert torch.equal(half, rounded.to(dtype))
    assert (half.float() - full).abs().max() < 0.1


def test_shared_draw_between_feature_maps():
    """positive and hyperbolic RFA with the same S consume the same omega (common random numbers)."""
    q, k, v = make_qkv()
    pos, hyp = ev.RFA(num_features=8), ev.RFA(num_features=8, feature_map="hyperbolic")
    draw = pos.draw(q, k, replicates=2, generator=0)
    assert hyp.noise_kind == pos.noise_kind and hyp.noise_layout(q, k) == pos.noise_layout(q, k)
    assert (hyp(q, k, v, draw) - rfa_reference(q, k, v, draw.noise, "hyperbolic")).abs().max() < 1e-10


def test_draw_checks_layout_and_kind():
    q, k, v = make_qkv(d=4)
    est = ev.RFA(num_features=8)
    with pytest.raises(ValueError, match=r"expected \(replicates, 8, 4\)"):
        est(q, k, v, ev.Draw(torch.randn(2, 7, 4)))
    orth = ev.RFA(num_features=8, sampler="orthogonal").draw(q, k, replicates=2, generator=0)
    with pytest.raises(ValueError, match="omega:orthogonal"):
        est(q, k, v, orth)
    # a bare Draw of given noise is accepted for any estimator with that layout
    assert est(q, k, v, ev.Draw(torch.randn(2, 8, 4, dtype=torch.float64))).shape == (2, 12, 3)


def test_dataclass_variant():
    import dataclasses

    est = dataclasses.replace(ev.RFA(num_features=8), num_features=16)
    assert est.num_features == 16 and est.columns == 16
    assert ev.RFA(num_features=16, feature_map="trig").columns == 32


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", [{"feature_map": m} for m in MAPS] + [{"eps": 1e-3}], ids=MAPS + ["eps"])
def test_independent_noise_per_batch_element(options, causal):
    q, k, v = make_qkv(N=CAUSAL_BLOCK + 3, d=4, dv=3, batch=(2, 3), norm=0.8)
    assert_independent_noise_per_element(ev.RFA(num_features=5, causal=causal, shared_noise=False, **options), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_hyperbolic_is_positive_on_antithetic_pairs(causal):
    """Hyperbolic features of w are the positive features of [w, -w]: the same output whichever way it is built."""
    q, k, v = make_qkv(N=CAUSAL_BLOCK + 7, d=5, dv=3, batch=(2,), norm=1.1)
    hyperbolic = ev.RFA(num_features=6, feature_map="hyperbolic", causal=causal)
    draw = hyperbolic.draw(q, k, replicates=3, generator=4)
    pairs = ev.Draw(torch.cat([draw.noise, -draw.noise], dim=1), draw.kind)
    positive = ev.RFA(num_features=12, causal=causal)
    assert (hyperbolic(q, k, v, draw) - positive(q, k, v, pairs)).abs().max() < 1e-12


def test_shared_noise_is_one_draw_for_every_head():
    """Identical heads give identical estimates under shared noise and different ones under independent noise."""
    q, k, v = (t.expand(2, *t.shape) for t in make_qkv(N=10, d=4, dv=3))
    shared, independent = (ev.RFA(num_features=8, shared_noise=s) for s in (True, False))
    out = shared(q, k, v, shared.draw(q, k, replicates=2, generator=0))
    assert torch.equal(out[:, 0], out[:, 1])
    out = independent(q, k, v, independent.draw(q, k, replicates=2, generator=0))
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3
