"""T2R and Hedgehog as estimators: the parameter contract (tensor fields, learnable_fields, replace, per-head
broadcasting, released initialisations), gradients in the parameters, and the protocol checks."""
import dataclasses

import pytest
import torch

import evalab as ev
from conftest import make_qkv
from evalab.testing import check_estimator, check_instances


@pytest.mark.parametrize("cls", [ev.T2R, ev.Hedgehog, ev.ReBased])
def test_check_estimator(cls):
    for est in check_instances(cls):
        check_estimator(est)


def test_released_initialisations():
    h = ev.Hedgehog(d=5, feature_dim=5, heads=(2, 3))
    assert h.q_weight.shape == (2, 3, 5, 5) and h.q_bias.shape == (2, 3, 5) and h.gamma.shape == (2, 3)
    assert torch.equal(h.q_weight[1, 2], torch.eye(5)) and torch.equal(h.k_weight[0, 0], torch.eye(5))
    assert not h.q_bias.any() and not h.gamma.any()
    t = ev.T2R(d=16, feature_dim=8, seed=3)
    bound = 16**-0.5
    assert t.q_weight.abs().max() <= bound and t.q_weight.abs().max() > 0.8 * bound
    assert not torch.equal(t.q_weight, t.k_weight)  # queries and keys draw their own weights
    assert torch.equal(ev.T2R(d=16, feature_dim=8, seed=3).q_weight, t.q_weight)  # seeded
    assert not torch.equal(ev.T2R(d=16, feature_dim=8, seed=4).q_weight, t.q_weight)


def test_replace_gives_new_parameters_and_select_one_head():
    est = ev.Hedgehog.initialised(layers=2, heads=3, d=4, feature_dim=3, init="uniform", seed=1)
    assert est.heads == (2, 3) and set(est.learnable_fields) == set(est.parameters())
    doubled = dataclasses.replace(est, q_weight=2 * est.q_weight)
    assert torch.equal(doubled.q_weight, 2 * est.q_weight) and torch.equal(doubled.k_weight, est.k_weight)
    q, k, v = make_qkv(N=10, d=4, dv=2, batch=(2, 3), seed=2)
    out = est(q, k, v, est.draw(q, k))
    for index in ((0, 0), (1, 2)):  # per-head parameters: each batch element uses its own
        one = est.select(index)
        assert one.heads == ()
        assert (out[(slice(None), *index)] - one(q[index], k[index], v[index], one.draw(q, k))).abs().max() < 1e-12
    per_head = ev.T2R(d=4, feature_dim=3, heads=3)  # (H,) parameters broadcast over a leading axis
    assert per_head(q, k, v, per_head.draw(q, k)).shape == (1, 2, 3, 10, 2)


def test_parameter_checks():
    est = ev.Hedgehog(d=4, feature_dim=3)
    with pytest.raises(ValueError, match=r"q_weight has shape \(3, 5\), expected \(3, 4\)"):
        dataclasses.replace(est, q_weight=torch.zeros(3, 5))
    with pytest.raises(TypeError, match="k_bias must be a floating torch.Tensor"):
        dataclasses.replace(est, k_bias=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="heads="):
        ev.T2R(heads=(0,))
    with pytest.raises(ValueError, match="feature_dim = d"):
        ev.ReBased(d=4, feature_dim=8)
    with pytest.raises(ValueError, match="variant='relu'"):
        ev.Hedgehog(variant="relu")
    q, k, v = make_qkv(N=6, d=8)
    with pytest.raises(ValueError, match="d=4"):
        est(q, k, v, est.draw(q, k))
    heads = ev.T2R(d=8, feature_dim=3, heads=(4,))
    q, k, v = make_qkv(N=6, d=8, batch=(3,))
    with pytest.raises(ValueError, match="leading axes"):
        heads(q, k, v, heads.draw(q, k))


@pytest.mark.parametrize("est", [ev.Hedgehog(d=3, feature_dim=3, init="uniform", window=3, window_kind="sliding"),
                                 ev.Hedgehog(d=3, feature_dim=2, variant="joint_softmax", causal=True),
                                 ev.T2R(d=3, feature_dim=4, window=3, window_kind="block", causal=True,
                                        shift="row_max", affine=False),
                                 ev.ReBased(d=3, window=3, window_kind="sliding", causal=True)], ids=repr)
def test_differentiable_in_the_parameters(est):
    """gradcheck in float64: the call is a pure function of the parameters (no in-place op on them)."""
    q, k, v = make_qkv(N=8, d=3, dv=2, norm=1.2, seed=3)
    names, g = est.learnable_fields, torch.Generator().manual_seed(4)
    params = tuple((t.double() + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)).requires_grad_()
                   for t in (est.parameters()[n] for n in names))

    def call(*values):
        return dataclasses.replace(est, **dict(zip(names, values)))(q, k, v, est.draw(q, k))

    assert torch.autograd.gradcheck(call, params, fast_mode=True)
