"""The feature maps against literal float64 formulas, and every feature-map estimator (fixed and learned maps,
with and without an exact window) against the N x M kernel written out."""
import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv, scaled
from evalab.estimators import feature_maps as fm
from evalab.estimators.linear import RELU_EPS, prefix_sums_flops
from evalab.estimators.window import QUERY_BLOCK, pairs, query_block


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_taylor_kernel_is_the_second_order_expansion():
    x, y = gaussian(50, 7, seed=1), gaussian(60, 7, seed=2)
    t = x @ y.T
    kernel = fm.taylor(x) @ fm.taylor(y).T
    assert fm.taylor(x).shape[-1] == fm.taylor_columns(7) == 1 + 7 + 28
    assert (kernel - (1 + t + t * t / 2)).abs().max() < 1e-12 * (1 + t * t).max()


def test_taylor_gap_is_the_first_omitted_term():
    """exp(t) - (1 + t + t^2/2) = t^3/6 + O(t^4): the ratio tends to 1 as t -> 0."""
    x, y = gaussian(1, 5, seed=3), gaussian(1, 5, seed=4)
    for s in (1e-1, 1e-2):
        t = float(s * x @ (s * y).T)
        gap = math.exp(t) - float(fm.taylor(s * x) @ fm.taylor(s * y).T)
        assert abs(gap / (t**3 / 6) - 1) < 2 * abs(t)


@pytest.mark.parametrize("nu", [1, 3])
def test_dpfp_literal(nu):
    x = gaussian(4, 5, seed=5)
    d = x.shape[-1]
    out = fm.dpfp(x, nu)
    for row in range(4):
        r = [max(float(x[row, i]), 0.0) for i in range(d)] + [max(-float(x[row, i]), 0.0) for i in range(d)]
        literal = [r[i] * r[(i - j) % (2 * d)] for j in range(1, nu + 1) for i in range(2 * d)]
        assert out[row].tolist() == pytest.approx(literal, rel=1e-15, abs=0)


def test_t2r_literal():
    x, w, b = gaussian(3, 4, seed=6), gaussian(5, 4, seed=7), gaussian(5, seed=8)
    literal = [[max(sum(float(w[f, i] * x[n, i]) for i in range(4)) + float(b[f]), 0.0) for f in range(5)]
               for n in range(3)]
    assert (fm.t2r(x, w, b) - torch.tensor(literal, dtype=torch.float64)).abs().max() < 1e-14


@pytest.mark.parametrize("variant", fm.HEDGEHOG_VARIANTS)
def test_hedgehog_literal(variant):
    x, w, b = gaussian(3, 4, seed=9), gaussian(5, 4, seed=10), gaussian(5, seed=11)
    out = fm.hedgehog(x, w, b, variant)
    for n in range(3):
        u = [sum(float(w[f, i] * x[n, i]) for i in range(4)) + float(b[f]) for f in range(5)]
        pos, neg = [math.exp(a) for a in u], [math.exp(-a) for a in u]
        if variant == "softmax":
            literal = [p / sum(pos) for p in pos] + [m / sum(neg) for m in neg]
        elif variant == "joint_softmax":
            both = [math.exp(2 * a) for a in u] + [math.exp(-2 * a) for a in u]
            literal = [e / sum(both) for e in both]
        else:  # exp: up to a factor common to the row
            literal = pos + neg
            ratio = out[n] / torch.tensor(literal, dtype=torch.float64)
            assert (ratio / ratio[0] - 1).abs().max() < 1e-13
            continue
        assert out[n].tolist() == pytest.approx(literal, rel=1e-13, abs=0)


def test_rebased_kernel_literal():
    """(z_x.z_y)^2 / d with z = layer_norm(x) * w + b written out (biased variance, epsilon 1e-5)."""
    x, y, w, b = gaussian(5, 6, seed=12), gaussian(7, 6, seed=13), gaussian(6, seed=14), gaussian(6, seed=15)

    def z(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b

    kernel = fm.rebased(x, w, b) @ fm.rebased(y, w, b).T
    assert (kernel - (z(x) @ z(y).T) ** 2 / 6).abs().max() < 1e-12 * kernel.abs().max()


def reference(est, q, k, v):
    """A_nm = g e^{l_nm - c_n} in the window, a phi(x_n).psi(y_m) outside it (causal: m <= n), Y = A v / A 1,
    the N x M way in float64 from the literal maps; g, a and c_n as the estimator's fields say."""
    x, y = scaled(q), scaled(k)
    if isinstance(est, ev.LinearAttention):
        if est.feature == "taylor":
            phi = psi = lambda t: torch.cat([torch.ones_like(t[..., :1]), t, torch.stack(  # noqa: E731
                [t[..., i] * t[..., j] * (2**-0.5 if i == j else 1) for i in range(t.shape[-1])
                 for j in range(i, t.shape[-1])], -1)], -1)
        else:
            phi = psi = {"elu": fm.elu, "relu": fm.relu, "dpfp": lambda t: fm.dpfp(t, est.nu)}[est.feature]
        eps = RELU_EPS if est.feature in ("relu", "dpfp") else 0.0
    else:
        p = {name: t.double() for name, t in est.parameters().items()}
        if isinstance(est, ev.T2R):
            phi = lambda t: torch.relu(t @ p["q_weight"].transpose(-1, -2) + p["q_bias"].unsqueeze(-2))  # noqa: E731
            psi = lambda t: torch.relu(t @ p["k_weight"].transpose(-1, -2) + p["k_bias"].unsqueeze(-2))  # noqa: E731
            eps = RELU_EPS
        elif isinstance(est, ev.ReBased):
            phi = lambda t: fm.rebased(t, p["q_weight"], p["q_bias"])  # noqa: E731
            psi = lambda t: fm.rebased(t, p["k_weight"], p["k_bias"])  # noqa: E731
            eps = RELU_EPS
        else:
            phi = lambda t: fm.hedgehog(t, p["q_weight"], p["q_bias"], est.variant)  # noqa: E731
            psi = lambda t: fm.hedgehog(t, p["k_weight"], p["k_bias"], est.variant, keys=True)  # noqa: E731
            eps = 0.0
    feat = phi(x) @ psi(y).transpose(-1, -2) + eps
    N, M = x.shape[-2], y.shape[-2]
    if est.window:
        n, m = torch.arange(N).unsqueeze(-1), torch.arange(M)
        w = est.window
        if est.window_kind == "block":
            inside = m // w == n // w
        elif est.causal:
            inside = (n - m >= 0) & (n - m < w)
        else:
            inside = (m - n >= -(w // 2)) & (m - n < (w + 1) // 2)
        logits = x @ y.transpose(-1, -2)
        if est.causal:
            inside = inside & (m <= n)
        c = logits.masked_fill(~inside, -torch.inf).amax(-1, keepdim=True) if est.shift == "row_max" else 0.0
        g = torch.sigmoid(torch.as_tensor(est.gamma, dtype=torch.float64)).unsqueeze(-1).unsqueeze(-1)
        a = 1 - g if est.affine else 1.0
        kern = torch.where(inside, g * torch.exp(logits - c), a * feat)
    else:
        kern = feat
    if est.causal:
        kern = kern.tril()
    return kern @ v / kern.sum(-1, keepdim=True)


ESTIMATORS = [
    ev.LinearAttention(feature="taylor"),
    ev.LinearAttention(feature="dpfp", nu=2),
    ev.LinearAttention(feature="taylor", window=8, window_kind="sliding"),
    ev.LinearAttention(feature="elu", window=5, window_kind="block", gamma=1.3, shift="row_max"),
    ev.LinearAttention(feature="dpfp", nu=1, window=7, window_kind="sliding", affine=False, gamma=-0.4),
    ev.T2R(d=6, feature_dim=5, seed=3),
    ev.T2R(d=6, feature_dim=5, window=8, window_kind="sliding", shift="row_max", affine=False),
    ev.Hedgehog(d=6, feature_dim=4, init="uniform", seed=1),
    ev.Hedgehog(d=6, feature_dim=4, init="uniform", variant="joint_softmax", window=8, window_kind="block"),
    ev.Hedgehog(d=6, feature_dim=6, variant="exp", window=9, window_kind="sliding", shift="row_max"),
    dataclasses.replace(ev.ReBased(d=6), q_weight=gaussian(6, seed=16), k_bias=gaussian(6, seed=17)),
    ev.ReBased(d=6, window=8, window_kind="block"),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_matches_the_kernel_written_out(est, causal):
    est = dataclasses.replace(est, causal=causal)
    N = QUERY_BLOCK + 9  # a full block of queries and a partial one
    q, k, v = make_qkv(N=N, d=6, dv=3, batch=(2,), norm=1.5, seed=4)
    out = est(q, k, v, est.draw(q, k, replicates=2))
    assert out.shape == (2, 2, N, 3)
    assert (out[0] - reference(est, q, k, v)).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["block", "sliding"])
def test_window_covering_every_key_is_softmax(kind, causal):
    q, k, v = make_qkv(N=20, d=4, dv=3, norm=2.0, seed=5)
    for est in (ev.LinearAttention(feature="taylor", window=40, window_kind=kind, causal=causal, gamma=0.7),
                ev.Hedgehog(d=4, feature_dim=4, window=40, window_kind=kind, causal=causal, shift="row_max")):
        out = est(q, k, v, est.draw(q, k))[0]
        assert (out - ev.softmax_attention(q, k, v, causal=causal)).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_empty_window_is_the_plain_map(causal):
    """window = 0 is the plain map whatever gamma, shift and affine say; a one-key window next to it differs."""
    q, k, v = make_qkv(N=20, d=4, dv=3, norm=1.5, seed=6)
    plain = ev.LinearAttention(feature="taylor", causal=causal)
    for est in (ev.LinearAttention(feature="taylor", causal=causal, gamma=2.0, shift="row_max", affine=False),):
        assert (est(q, k, v, est.draw(q, k)) - plain(q, k, v, plain.draw(q, k))).abs().max() < 1e-14
    one = ev.LinearAttention(feature="taylor", causal=causal, window=1)
    assert (one(q, k, v, one.draw(q, k)) - plain(q, k, v, plain.draw(q, k))).abs().max() > 1e-3


@pytest.mark.parametrize("est", [ev.LinearAttention(feature="taylor", window=4, causal=True),
                                 ev.Hedgehog(d=4, feature_dim=3, window=4, window_kind="sliding", causal=True)], ids=repr)
def test_causal_never_looks_ahead(est):
    q, k, v = make_qkv(N=50, d=4, dv=2, seed=7)
    n = 30
    k2, v2 = k.clone(), v.clone()
    k2[n + 1 :], v2[n + 1 :] = 3 * torch.randn_like(k2[n + 1 :]), torch.randn_like(v2[n + 1 :])
    out, out2 = est(q, k, v, est.draw(q, k)), est(q, k2, v2, est.draw(q, k))
    assert (out[:, : n + 1] - out2[:, : n + 1]).abs().max() < 1e-12
    assert (out[:, n + 1 :] - out2[:, n + 1 :]).abs().max() > 1e-3


def test_gradients():
    """gradcheck in float64 on a tiny input: in q, k, v for the fixed maps, and in the parameters (gamma, W, b)."""
    q, k, v = (t.requires_grad_() for t in make_qkv(N=9, d=3, dv=2, norm=1.2, seed=8))
    for est in (ev.LinearAttention(feature="taylor", causal=True),
                ev.LinearAttention(feature="taylor", window=3, causal=True),
                ev.LinearAttention(feature="dpfp", nu=2, window=4, window_kind="block")):
        call = lambda q, k, v, est=est: est(q, k, v, est.draw(q, k))  # noqa: E731
        assert torch.autograd.gradcheck(call, (q, k, v), fast_mode=True)
    gamma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    est = ev.LinearAttention(feature="taylor", window=3, window_kind="sliding")
    call = lambda g: dataclasses.replace(est, gamma=g)(q, k, v, est.draw(q, k))  # noqa: E731
    assert torch.autograd.gradcheck(call, (gamma,), fast_mode=True)


@pytest.mark.parametrize("est", [ev.LinearAttention(feature="taylor", window=16, window_kind="sliding"),
                                 ev.LinearAttention(feature="dpfp", nu=2, window=12, window_kind="block", causal=True),
                                 ev.Hedgehog(d=16, feature_dim=8, window=16, window_kind="sliding", causal=True),
                                 ev.T2R(d=16, feature_dim=8, window=10, window_kind="sliding")], ids=repr)
def test_hybrid_cost_counts_the_matrix_products(est):
    """cost() minus its stated elementwise terms equals FlopCounterMode's matmul FLOPs at N = M = 70."""
    N = M = 70
    d, dv = 16, 8
    q, k, v = make_qkv(N=N, d=d, dv=dv, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, est.draw(q, k))
    lo, hi = est.bounds(N, M)
    block = query_block(est.window, est.window_kind)
    P = pairs(lo, hi, block)
    elementwise = est.map_flops(N, M, d)[1] + N * dv + 4 * P + 5 * N * dv
    for bound in [lo] if est.causal else [lo, (M - hi)[::-1]]:
        elementwise += prefix_sums_flops(bound, block, est.columns(d), dv + 1)[1]
    assert est.cost(N=N, M=M, d=d, dv=dv).flops() - elementwise == counter.get_total_flops()


@pytest.mark.parametrize("causal", [False, True])
def test_float32_hybrid_finite_at_large_logits(causal):
    """Logits up to 100 (e^100 overflows float32): the log-space combination stays finite and matches float64."""
    q, k, v = make_qkv(N=40, d=8, dv=4, norm=10.0, seed=10)
    for est in (ev.LinearAttention(feature="elu", window=8, causal=causal),
                ev.Hedgehog(d=8, feature_dim=8, window=8, window_kind="block", causal=causal, init="uniform")):
        ref = est(q, k, v, est.draw(q, k))
        out = est(q.float(), k.float(), v.float(), est.draw(q, k))
        assert torch.isfinite(out).all() and (out.double() - ref).abs().max() < 1e-4


def test_half_inputs_compute_in_float32():
    q, k, v = make_qkv(N=24, d=8, dv=4, norm=1.5, seed=9)
    for est in (ev.LinearAttention(feature="taylor", window=8), ev.Hedgehog(d=8, feature_dim=8, window=8),
                ev.T2R(d=8, feature_dim=8)):
        ref = est(q, k, v, est.draw(q, k))
        for dtype in (torch.float16, torch.bfloat16):
            out = est(q.to(dtype), k.to(dtype), v.to(dtype), est.draw(q, k))
            assert out.dtype == dtype
            assert (out.double() - ref).abs().max() < 3e-2


def test_checks():
    with pytest.raises(ValueError, match="feature='gelu'"):
        ev.LinearAttention(feature="gelu")
    with pytest.raises(ValueError, match="shift='max'"):
        ev.LinearAttention(shift="max")
    with pytest.raises(ValueError, match="window_kind='dilated'"):
        ev.LinearAttention(window=4, window_kind="dilated")
    with pytest.raises(ValueError, match="nu must be >= 1"):
        ev.LinearAttention(feature="dpfp", nu=0)
