"""Nystrom against a hand-written float64 formula and the identities of docs/theory.md section 11."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv, scaled
from evalab.estimators.nystrom import iterative_pinv


def segments(L, m):
    """Index ranges of m contiguous segments of L positions, the shorter ones first."""
    size, short = L // m, (L // m + 1) * m - L
    bounds, start = [], 0
    for j in range(m):
        stop = start + size + (j >= short)
        bounds.append((start, stop))
        start = stop
    assert start == L
    return bounds


def nystrom_reference(q, k, v, m, pinv="exact", iterations=6, init="exact"):
    """A1 Z A3 V from the definitions, one segment at a time, float64."""
    x, y = scaled(q.double()), scaled(k.double())
    xl = torch.stack([x[..., a:b, :].mean(-2) for a, b in segments(x.shape[-2], m)], dim=-2)
    yl = torch.stack([y[..., a:b, :].mean(-2) for a, b in segments(y.shape[-2], m)], dim=-2)
    a1 = torch.softmax(x @ yl.transpose(-1, -2), -1)
    a2 = torch.softmax(xl @ yl.transpose(-1, -2), -1)
    a3 = torch.softmax(xl @ y.transpose(-1, -2), -1)
    if pinv == "exact":
        z = torch.linalg.pinv(a2)
    else:
        eye = torch.eye(m, dtype=torch.float64)
        col = a2.sum(-2)
        norm = col.max() if init == "original" else col.amax(-1)[..., None, None] * a2.sum(-1).amax(-1)[..., None, None]
        z = a2.transpose(-1, -2) / norm
        for _ in range(iterations):
            p = a2 @ z
            z = 0.25 * z @ (13 * eye - p @ (15 * eye - p @ (7 * eye - p)))
    return (a1 @ z @ a3) @ v.double()


@pytest.mark.parametrize("pinv,init", [("exact", "original"), ("iterative", "original"), ("iterative", "exact")])
@pytest.mark.parametrize("N,M,m", [(24, 24, 6), (23, 30, 5), (17, 17, 17)])
def test_matches_reference(pinv, init, N, M, m):
    q, k, v = make_qkv(N=N, M=M, d=6, dv=3, batch=(2, 2), norm=1.2)
    est = ev.Nystrom(num_landmarks=m, pinv=pinv, init=init)
    out = est(q, k, v, est.draw(q, k, replicates=2))
    assert out.shape == (2, 2, 2, N, 3)
    assert (out[0] - out[1]).abs().max() == 0
    assert (out[0] - nystrom_reference(q, k, v, m, pinv, init=init)).abs().max() < 1e-10


def test_original_init_takes_the_max_over_the_whole_batch():
    """init="original" couples the heads (as the reference does); "exact" treats each alone."""
    q, k, v = make_qkv(N=16, d=4, dv=2, batch=(3,), norm=2.0)
    for init, coupled in (("original", True), ("exact", False)):
        est = ev.Nystrom(num_landmarks=8, init=init, pinv_iterations=2)
        whole = est(q, k, v, est.draw(q, k))[0, 1]
        alone = est(q[1:2], k[1:2], v[1:2], est.draw(q, k))[0, 0]
        assert ((whole - alone).abs().max() > 1e-8) == coupled


def test_all_landmarks_with_exact_pinv_is_softmax():
    q, k, v = make_qkv(N=20, d=5, dv=3, batch=(2,), norm=1.0)
    est = ev.Nystrom(num_landmarks=20, pinv="exact")
    out = est(q, k, v, est.draw(q, k))[0]
    assert (out - ev.softmax_attention(q, k, v)).abs().max() < 1e-10


@pytest.mark.parametrize("N,m", [(24, 6), (22, 5), (9, 4)])
def test_segment_constant_inputs_with_exact_pinv_is_softmax(N, m):
    q, k, v = make_qkv(N=N, d=5, dv=3, norm=1.5)
    for a, b in segments(N, m):  # constant q and k on each segment, generic v
        q[a:b], k[a:b] = q[a], k[a]
    est = ev.Nystrom(num_landmarks=m, pinv="exact")
    out = est(q, k, v, est.draw(q, k))[0]
    assert (out - ev.softmax_attention(q, k, v)).abs().max() < 1e-10


def test_rows_sum_to_one_with_exact_pinv_and_matrix_metrics_skip_negative_rows():
    q, k, v = make_qkv(N=32, d=8, dv=3, norm=2.0)
    est = ev.Nystrom(num_landmarks=8, pinv="exact")
    a_hat = ev.attention_matrix(est, q, k, est.draw(q, k))
    assert (a_hat.sum(-1) - 1).abs().max() < 1e-10
    assert a_hat.min() < 0  # not a distribution: row KL/TV do not apply
    res = ev.monte_carlo(est, q, k, v, replicates=2)
    assert res.matrix_skipped.startswith("rows have negative entries")
    assert res.variance.value == 0 and res.mse.value == pytest.approx(res.bias2.value)


def test_iteration_error_recursion():
    """E_{j+1} = 1/4 E_j^3 (3 I + E_j) with E_j = I - A2 Z_j, for each step of the implemented iteration."""
    q, k, _ = make_qkv(N=32, d=8, norm=1.5)
    m = 8
    x, y = scaled(q), scaled(k)
    seg = lambda t: t.unflatten(-2, (m, -1)).mean(-2)  # noqa: E731 -- m divides N: equal segments
    a2 = torch.softmax(seg(x) @ seg(y).T, -1)
    eye = torch.eye(m, dtype=torch.float64)
    errors = [eye - a2 @ iterative_pinv(a2, j, "exact") for j in range(7)]
    for e, e_next in zip(errors, errors[1:]):
        assert (e_next - 0.25 * e @ e @ e @ (3 * eye + e)).abs().max() < 1e-12
    assert errors[-1].abs().max() < errors[0].abs().max()


def test_float32_finite_at_large_norm():
    q, k, v = make_qkv(N=64, d=16, dv=4, norm=10.0, dtype=torch.float32)
    for pinv in ("iterative", "exact"):
        est = ev.Nystrom(num_landmarks=8, pinv=pinv)
        out = est(q, k, v, est.draw(q, k))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("pinv", ["iterative", "exact"])
def test_cost_counts_the_matrix_products(pinv):
    """cost() minus its stated elementwise terms (and the exact pinv's SVD) equals FlopCounterMode's matmul FLOPs."""
    N = M = 64
    d = dv = 16
    m = 8
    q, k, v = make_qkv(N=N, d=d, dv=dv, dtype=torch.float32)
    est = ev.Nystrom(num_landmarks=m, pinv=pinv)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, est.draw(q, k))
    elementwise = (N + M) * d + 2 * m * d + 4 * m * (N + M + m)
    elementwise += 24 * m**3 if pinv == "exact" else 6 * 4 * m * m + 2 * m * m
    assert est.cost(N=N, M=M, d=d, dv=dv).flops() - elementwise == counter.get_total_flops()


def test_checks():
    with pytest.raises(ValueError, match="non-causal"):
        ev.Nystrom(causal=True)
    with pytest.raises(ValueError, match="pinv='svd'"):
        ev.Nystrom(pinv="svd")
    q, k, v = make_qkv(N=6)
    with pytest.raises(ValueError, match="num_landmarks=8 must be at most N=6"):
        ev.Nystrom(num_landmarks=8)(q, k, v, ev.Nystrom().draw(q, k))
