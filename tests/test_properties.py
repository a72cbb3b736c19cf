"""Property-based checks over shapes and options (hypothesis, derandomised so runs are reproducible)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evalab as ev

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def inputs(draw, square=True):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    N = draw(st.integers(1, 24))
    M = N if square else draw(st.integers(1, 24))
    d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    norm = draw(st.floats(0.0, 3.0))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, M, d, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm * d**0.25
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm * d**0.25
    v = torch.randn(*batch, M, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _assert_convex(out, v):
    tol = 1e-4 if out.dtype == torch.float32 else 1e-9
    assert (out <= v.amax(-2).unsqueeze(-2) + tol).all()
    assert (out >= v.amin(-2).unsqueeze(-2) - tol).all()


@SETTINGS
@given(inputs(square=False), st.booleans())
def test_softmax_is_convex(qkv, causal):
    q, k, v = qkv
    if causal and q.shape[-2] != k.shape[-2]:
        causal = False
    out = ev.softmax_attention(q, k, v, causal=causal)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    _assert_convex(out, v)


@SETTINGS
@given(inputs(), st.integers(1, 16), st.sampled_from(["positive", "hyperbolic", "trig"]),
       st.sampled_from(["iid", "orthogonal", "qmc"]), st.booleans())
def test_rfa_finite_and_convex(qkv, S, feature_map, sampler, causal):
    q, k, v = qkv
    est = ev.RFA(num_features=S, feature_map=feature_map, sampler=sampler, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=2, generator=0))
    assert out.shape == (2, *q.shape[:-1], v.shape[-1])
    if feature_map != "trig":  # trig features are signed: no convexity, and the ratio may blow up
        assert torch.isfinite(out).all()
        _assert_convex(out, v)


@SETTINGS
@given(inputs(), st.integers(0, 3), st.integers(0, 4), st.integers(1, 3), st.sampled_from(["zero", "mean", "half-mean"]),
       st.sampled_from(["exact", "mean", "official"]), st.sampled_from(["disjoint", "official"]), st.booleans())
def test_eva_finite_and_convex(qkv, blocks, chunk_size, samples, proposal, chunk_logit, partition, causal):
    q, k, v = qkv
    window = blocks * chunk_size if chunk_size else blocks * 3
    try:
        est = ev.EVA(window=window, chunk_size=chunk_size, samples_per_chunk=samples, proposal=proposal,
                     chunk_logit=chunk_logit, partition=partition, causal=causal)
    except ValueError as err:  # documented invalid combinations only
        assert "nothing to attend" in str(err) or "causal EVA with window=0" in str(err)
        return
    out = est(q, k, v, est.draw(q, k, replicates=2, generator=0))
    assert out.shape == (2, *q.shape[:-1], v.shape[-1])
    assert torch.isfinite(out).all()
    _assert_convex(out, v)  # every EVA output is a convex combination of values and chunk averages


@SETTINGS
@given(inputs(square=False), st.integers(1, 8), st.sampled_from(["shared", "optimal", "chunked"]), st.integers(1, 6))
def test_control_variates_finite_and_convex(qkv, S, coefficient, chunk_size):
    q, k, v = qkv
    est = ev.ControlVariates(num_features=S, coefficient=coefficient,
                             chunk_size=chunk_size if coefficient == "chunked" else None)
    out = est(q.double(), k.double(), v.double(), est.draw(q, k, replicates=2, generator=0))
    assert torch.isfinite(out).all()
    _assert_convex(out, v.double())


@SETTINGS
@given(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("positive", "hyperbolic", "trig")))
def test_unknown_feature_map_lists_valid_ones(name):
    with pytest.raises(ValueError, match="expected one of 'positive', 'hyperbolic', 'trig'"):
        ev.RFA(feature_map=name)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40))
def test_window_chunk_multiple_rule(window, chunk_size):
    if window % chunk_size:
        with pytest.raises(ValueError, match="must be a multiple of chunk_size"):
            ev.EVA(window=window, chunk_size=chunk_size)
    else:
        assert ev.EVA(window=window, chunk_size=chunk_size).window == window
