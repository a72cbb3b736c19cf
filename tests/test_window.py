"""Local windows: the bounds against their definitions written per pair, LocalWindow against a float64 masked
softmax, and its identities (a window covering every key is softmax)."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv, scaled
from evalab.estimators import window as win
from evalab.testing import check_estimator, check_instances


def in_window(n, m, w, kind, causal):
    """The definitions of the module docstring, one pair at a time."""
    if w == 0 or (causal and m > n):
        return False
    if kind == "block":
        return m // w == n // w
    if causal:
        return 0 <= n - m < w
    return -(w // 2) <= m - n < (w + 1) // 2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,w", [("block", 4), ("block", 5), ("sliding", 4), ("sliding", 5), ("block", 0),
                                    ("sliding", 1), ("sliding", 40)])
def test_bounds_match_the_definition(kind, w, causal):
    N = 23
    lo, hi = win.bounds(w, kind, N, N, causal=causal)
    for n in range(N):
        keys = [m for m in range(N) if in_window(n, m, w, kind, causal)]
        assert list(range(lo[n], hi[n])) == keys, n
    assert (np.diff(lo) >= 0).all() and (np.diff(hi) >= 0).all()


def reference(q, k, v, w, kind, causal):
    """Masked softmax in float64, the N x M way."""
    x, y = scaled(q), scaled(k)
    N, M = x.shape[-2], y.shape[-2]
    mask = torch.tensor([[in_window(n, m, w, kind, causal) for m in range(M)] for n in range(N)])
    logits = (x @ y.transpose(-1, -2)).masked_fill(~mask, -torch.inf)
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,w", [("block", 8), ("block", 5), ("block", 200), ("sliding", 7), ("sliding", 8),
                                    ("sliding", 1)])
def test_local_window_matches_masked_softmax(kind, w, causal):
    N = win.QUERY_BLOCK + 9  # a full block of queries and a partial one
    q, k, v = make_qkv(N=N, d=6, dv=3, batch=(2,), norm=2.0, seed=1)
    est = ev.LocalWindow(window=w, kind=kind, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=2))
    assert out.shape == (2, 2, N, 3)
    assert (out - reference(q, k, v, w, kind, causal)).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["block", "sliding"])
def test_window_covering_every_key_is_softmax(kind, causal):
    q, k, v = make_qkv(N=20, d=4, dv=3, norm=2.5, seed=2)
    est = ev.LocalWindow(window=40, kind=kind, causal=causal)
    out = est(q, k, v, est.draw(q, k))[0]
    assert (out - ev.softmax_attention(q, k, v, causal=causal)).abs().max() < 1e-12


def test_check_estimator_and_gradients():
    for est in check_instances(ev.LocalWindow):
        check_estimator(est)
    q, k, v = (t.requires_grad_() for t in make_qkv(N=10, d=3, dv=2, seed=3))
    est = ev.LocalWindow(window=4, kind="sliding", causal=True)
    assert torch.autograd.gradcheck(lambda q, k, v: est(q, k, v, est.draw(q, k)), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("kind,w,causal", [("block", 16, False), ("block", 5, True), ("sliding", 9, False),
                                           ("sliding", 16, True)])
def test_cost_counts_the_matrix_products(kind, w, causal):
    """cost() minus its stated elementwise term (4 per pair) equals FlopCounterMode's matmul FLOPs."""
    N, d, dv = 70, 16, 8
    q, k, v = make_qkv(N=N, d=d, dv=dv, dtype=torch.float32)
    est = ev.LocalWindow(window=w, kind=kind, causal=causal)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, est.draw(q, k))
    lo, hi = est.bounds(N, N)
    P = win.pairs(lo, hi, win.query_block(w, kind))
    assert est.cost(N=N, M=N, d=d, dv=dv).flops() - 4 * P == counter.get_total_flops()


def test_checks():
    with pytest.raises(ValueError, match="window"):
        ev.LocalWindow(window=0)
    with pytest.raises(ValueError, match="kind"):
        ev.LocalWindow(kind="dilated")
    q, k, v = make_qkv(N=6, M=8)
    est = ev.LocalWindow(window=4)
    with pytest.raises(ValueError, match="N == M"):
        est(q, k, v, est.draw(q, k))
