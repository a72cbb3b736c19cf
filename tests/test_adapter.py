"""FeatureMapAttention: a user's map measured as an estimator."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv
from evalab.estimators import feature_maps as fm
from evalab.testing import check_estimator


def test_wraps_a_callable_and_a_module():
    """evalab's own taylor map on scaled inputs, and an nn.Linear + softmax module, give the estimators they are."""
    q, k, v = make_qkv(N=40, d=6, dv=3, batch=(2,), norm=1.5, seed=1)
    wrapped = ev.FeatureMapAttention(fm.taylor, inputs="scaled", window=8, causal=True)
    native = ev.LinearAttention(feature="taylor", window=8, causal=True)
    assert (wrapped(q, k, v, wrapped.draw(q, k)) - native(q, k, v, native.draw(q, k))).abs().max() < 1e-12

    hh = ev.Hedgehog(d=6, feature_dim=5, init="uniform", seed=2, variant="joint_softmax")
    layers = []
    for side in ("q", "k"):
        layer = torch.nn.Linear(6, 5, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(getattr(hh, f"{side}_weight"))
            layer.bias.copy_(getattr(hh, f"{side}_bias"))
        layers.append(torch.nn.Sequential(layer, torch.nn.Unflatten(-1, (1, 5))))
    joint = [lambda x, m=m: torch.softmax(torch.cat([2 * m(x), -2 * m(x)], -1).flatten(-2), -1) for m in layers]
    wrapped = ev.FeatureMapAttention(joint[0], joint[1], inputs="scaled")
    assert (wrapped(q, k, v, wrapped.draw(q, k)) - hh(q, k, v, hh.draw(q, k))).abs().max() < 1e-12


def test_check_estimator_and_cost():
    relu_map = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU())
    for est in (ev.FeatureMapAttention(relu_map, guard=True), ev.FeatureMapAttention(fm.elu, causal=True, window=8)):
        check_estimator(est)
    est = ev.FeatureMapAttention(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()), guard=True)
    q, k, v = make_qkv(N=64, d=16, dv=16, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, est.draw(q, k))
    N, F = 64, 9
    elementwise = 3 * 2 * N * F + N * 16 + N * F
    assert est.cost(N=N, M=N, d=16, dv=16).flops() - elementwise == counter.get_total_flops()


def test_checks():
    with pytest.raises(TypeError, match="phi must be a callable"):
        ev.FeatureMapAttention(3)
    with pytest.raises(ValueError, match="inputs='unit'"):
        ev.FeatureMapAttention(fm.elu, inputs="unit")
