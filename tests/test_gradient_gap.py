"""ev.gradient_gap: gradient bias and variance against hand-written float64 RFA and softmax gradients."""
import math

import numpy as np
import pytest
import torch

import evalab as ev
from evalab.measure.gradient_gap import INPUTS, gradient_gap, projection_loss
from evalab.measure.monte_carlo import iter_draws, NOISE_BLOCK

from conftest import make_qkv


pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one intra-op thread is fastest


def rfa_by_hand(q, k, v, omega, scale):
    """Positive random features written out: phi(x) = exp(w.x - |x|^2 / 2) / sqrt(S), x = sqrt(scale) q."""
    x, y = q * math.sqrt(scale), k * math.sqrt(scale)
    phi = lambda z: torch.exp(z @ omega.T - 0.5 * (z * z).sum(-1, keepdim=True)) / math.sqrt(omega.shape[0])
    kernel = phi(x) @ phi(y).transpose(-1, -2)  # (*b, N, M)
    return kernel @ v / kernel.sum(-1, keepdim=True)


def softmax_by_hand(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), -1) @ v


def grads(fn, loss, tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    return torch.autograd.grad(loss(fn(*leaves)), leaves)


def test_rfa_gradient_gap_matches_hand_computation():
    q, k, v = make_qkv(N=6, d=4, dv=3, batch=(2,), norm=1.0)
    R, scale = 24, 4**-0.5
    est = ev.RFA(num_features=5)
    res = gradient_gap(est, q, k, v, replicates=R, seed=3)
    loss = projection_loss(q.shape[:-1] + v.shape[-1:], 3)
    exact = grads(lambda *t: softmax_by_hand(*t, scale), loss, (q, k, v))
    omega = torch.cat([d.noise for _, d in iter_draws(est, q, k, R, 3, NOISE_BLOCK)])  # monte_carlo's noise
    per_rep = [grads(lambda *t: rfa_by_hand(*t, omega[r], scale), loss, (q, k, v)) for r in range(R)]
    for i, name in enumerate(INPUTS):
        g = np.stack([p[i].numpy() for p in per_rep])  # (R, *shape)
        ref = exact[i].numpy()
        variance = g.var(0, ddof=1).sum(-1).mean()
        bias2 = ((g.mean(0) - ref) ** 2).sum(-1).mean() - variance / R
        power = (ref**2).sum(-1).mean()
        assert res.metrics[f"grad_{name}_variance"].value == pytest.approx(variance, rel=1e-8)
        assert res.metrics[f"grad_{name}_bias2"].value == pytest.approx(bias2, rel=1e-6, abs=1e-12)
        assert res.metrics[f"grad_{name}_rel_mse"].value == pytest.approx((variance + bias2) / power, rel=1e-6)
        assert torch.allclose(res.exact[name], exact[i])
    for name, e in res.metrics.items():
        assert e.low <= e.value <= e.high, name
    frame = res.to_frame()
    assert len(frame) == 1 and {"grad_q_rel_mse_low", "grad_v_bias2_high", "num_features"} <= set(frame.columns)
    assert "grad_k_rel_variance" in repr(res)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_has_no_gradient_gap(causal):
    q, k, v = make_qkv(N=7, d=4, dv=3, norm=1.2)
    res = gradient_gap(ev.Softmax(causal=causal), q, k, v, replicates=3, loss=lambda y: (y**2).sum())
    for name in INPUTS:
        assert res.metrics[f"grad_{name}_mse"].value < 1e-24
    # the causal reference: no gradient reaches the last key from earlier queries' outputs only
    if causal:
        only_first = gradient_gap(ev.Softmax(causal=True), q, k, v, replicates=2, loss=lambda y: y[..., :3, :].sum())
        assert torch.all(only_first.exact["k"][3:] == 0) and torch.all(only_first.exact["v"][3:] == 0)


def test_gradients_through_in_place_estimators_match_finite_differences():
    # EVA normalises its logits in place; the gradient gap's autograd must still be exact
    q, k, v = make_qkv(N=12, d=4, dv=3, norm=1.0)
    eva = ev.EVA(window=4, chunk_size=4)
    draw = eva.draw(q, k, replicates=1, generator=0)
    from evalab.measure.gradient_gap import _gradients

    g = _gradients(lambda *t: eva(*t, draw)[0], lambda y: y.sum(), (q, k, v))
    for i in range(3):
        for index in [(0, 0), (5, 2), (11, 3)] if i < 2 else [(0, 0), (7, 2)]:
            step = torch.zeros_like((q, k, v)[i])
            step[index] = 1e-6
            plus = [t + step if j == i else t for j, t in enumerate((q, k, v))]
            minus = [t - step if j == i else t for j, t in enumerate((q, k, v))]
            fd = (eva(*plus, draw).sum() - eva(*minus, draw).sum()) / 2e-6
            assert float(g[i][index]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_bad_arguments():
    q, k, v = make_qkv(N=4, d=4, dv=3)
    with pytest.raises(ValueError, match="replicates"):
        gradient_gap(ev.RFA(num_features=4), q, k, v, replicates=1)
    with pytest.raises(ValueError, match="scalar"):
        gradient_gap(ev.RFA(num_features=4), q, k, v, replicates=2, loss=lambda y: y)
