"""LinearAttention (elu + 1, relu) against a hand-written float64 formula."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv, scaled
from evalab.estimators.linear import RELU_EPS
from evalab.estimators.rfa import CAUSAL_BLOCK


def linear_reference(q, k, v, feature, causal=False):
    """sum_m K_nm v_m / sum_m K_nm with the kernel matrix K written out, float64."""
    x, y = scaled(q.double()), scaled(k.double())
    if feature == "elu":
        phi = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # noqa: E731 -- elu(t) + 1
        kern = phi(x) @ phi(y).transpose(-1, -2)
    else:
        kern = x.clamp_min(0) @ y.clamp_min(0).transpose(-1, -2) + RELU_EPS
    if causal:
        kern = kern.tril()
    return kern @ v.double() / kern.sum(-1, keepdim=True)


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(feature, causal):
    N = CAUSAL_BLOCK + 7  # a full causal block and a partial one
    q, k, v = make_qkv(N=N, d=6, dv=3, batch=(2,), norm=1.5)
    est = ev.LinearAttention(feature=feature, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=2))
    assert out.shape == (2, 2, N, 3)
    assert (out[0] - out[1]).abs().max() == 0
    assert (out[0] - linear_reference(q, k, v, feature, causal)).abs().max() < 1e-10


def test_cross_attention_and_scale():
    q, k, v = make_qkv(N=9, M=14, d=4, dv=2)
    est = ev.LinearAttention(scale=0.3)
    ref = linear_reference(q * math.sqrt(0.3 / 4**-0.5), k * math.sqrt(0.3 / 4**-0.5), v, "elu")
    assert (est(q, k, v, est.draw(q, k))[0] - ref).abs().max() < 1e-10


def test_relu_query_that_meets_no_key_attends_uniformly():
    q, k, v = make_qkv(N=5, d=4, dv=3)
    q = -q.abs()  # relu(x) = 0 for every query
    est = ev.LinearAttention(feature="relu")
    out = est(q, k, v, est.draw(q, k))[0]
    assert (out - v.mean(-2)).abs().max() < 1e-12


@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_causal_never_looks_ahead(feature):
    q, k, v = make_qkv(N=70, d=4, dv=2)
    est = ev.LinearAttention(feature=feature, causal=True)
    draw = est.draw(q, k)
    n = 40
    k2, v2 = k.clone(), v.clone()
    k2[n + 1 :], v2[n + 1 :] = 5 * torch.randn_like(k2[n + 1 :]), torch.randn_like(v2[n + 1 :])
    out, out2 = est(q, k, v, draw), est(q, k2, v2, draw)
    assert (out[:, : n + 1] - out2[:, : n + 1]).abs().max() < 1e-12
    assert (out[:, n + 1 :] - out2[:, n + 1 :]).abs().max() > 1e-3


def test_float32_finite_at_large_norm():
    q, k, v = make_qkv(N=40, d=16, dv=4, norm=10.0, dtype=torch.float32)
    for causal in (False, True):
        est = ev.LinearAttention(causal=causal)
        out = est(q, k, v, est.draw(q, k))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("feature", ["elu", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [64, 70])
def test_cost_counts_the_matrix_products(feature, causal, N):
    """cost() minus its stated elementwise terms equals FlopCounterMode's matmul FLOPs."""
    d = dv = 16
    q, k, v = make_qkv(N=N, d=d, dv=dv, dtype=torch.float32)
    est = ev.LinearAttention(feature=feature, causal=causal)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, est.draw(q, k))
    F = d if feature == "elu" else d + 1
    elementwise = 3 * 2 * N * F + N * dv
    if causal:
        blocks = [CAUSAL_BLOCK] * (N // CAUSAL_BLOCK) + [N % CAUSAL_BLOCK] * (N % CAUSAL_BLOCK > 0)
        elementwise += sum(3 * t * F + t * t for t in blocks)
    else:
        elementwise += N * F
    assert est.cost(N=N, M=N, d=d, dv=dv).flops() - elementwise == counter.get_total_flops()


def test_checks():
    with pytest.raises(ValueError, match="feature='gelu'"):
        ev.LinearAttention(feature="gelu")
