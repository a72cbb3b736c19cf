"""Every registered estimator is differentiable in q, k and v by plain autograd, checked by
``torch.autograd.gradcheck`` (float64 finite differences) on a fixed draw; and the out-of-place path autograd
takes gives the same numbers as the in-place one taken without gradients.

Estimators are taken from the registry, so new ones join automatically (with their defaults, or the small
configurations of SMALL). Deterministic: no statistical false positives.
"""
import pytest
import torch

from conftest import make_qkv
from evalab import registry

#: Configurations per registered name that fit N = 6, d = 4 and cover the code paths that differ (feature maps,
#: causal sums, chunk logits, supports); a name not listed runs with its defaults.
SMALL = {
    "softmax": [{}, {"causal": True}],
    "rfa": [dict(num_features=3, feature_map=m, causal=c)
            for m, c in (("positive", False), ("hyperbolic", True), ("trig", False), ("trig", True), ("oprf", False),
                         ("sderf", True), ("saderf", False))]
           + [dict(num_features=3, eps=0.1), dict(num_features=3, feature_map="hyperbolic", eps=0.1, causal=True),
              dict(num_features=3, shared_noise=False)],
    "eva": [dict(window=2, chunk_size=2, chunk_logit=logit, partition=partition, causal=causal, samples_per_chunk=s,
                 proposal=proposal, noise_scale=0.9)
            for logit, partition, causal, s, proposal in (
                ("mean", "disjoint", False, 1, "mean"), ("exact", "official", False, 2, "half-mean"),
                ("official", "official", True, 1, "mean"), ("rf", "disjoint", True, 2, "zero"))]
           + [dict(window=4, chunk_size=3, partition="official"), dict(window=4, chunk_size=0),
              dict(window=2, chunk_size=2, shared_noise=False)],
    "control_variates": [dict(num_features=3, coefficient=c, chunk_size=size, feature_map=m)
                         for c, size, m in (("shared", None, "positive"), ("optimal", None, "hyperbolic"),
                                            ("chunked", 2, "saderf"), ("shared", None, "oprf"))],
    "ra": [dict(samples_per_query=2, causal=c) for c in (False, True)],
    "lara": [dict(num_proposals=2, samples_per_proposal=2, weights=w, antithetic=a)
             for w, a in (("balance", False), ("optimal", True))],
    "nystrom": [dict(num_landmarks=2, pinv=p) for p in ("iterative", "exact")],
    "linear_attention": [dict(feature=f, causal=c) for f, c in (("elu", False), ("relu", True))],
    "scatterbrain": [dict(window=w, support=s, num_features=3, feature_map=m, causal=c)
                     for w, s, m, c in ((2, "block", "positive", False), (3, "sliding", "hyperbolic", True),
                                        (0, "block", "positive", False), (3, "sliding", "positive", False))],
    "local_window": [dict(window=2, kind="block"), dict(window=3, kind="sliding", causal=True)],
    "t2r": [dict(d=4, feature_dim=3), dict(d=4, feature_dim=3, causal=True, window=2)],
    "hedgehog": [dict(d=4, feature_dim=3), dict(d=4, feature_dim=3, window=3, window_kind="block")],
    "rebased": [dict(d=4), dict(d=4, causal=True, window=2)],
}


def cases():
    return [pytest.param(name, params, id=f"{name}-{i}")
            for name, cls in registry.ESTIMATORS.items() for i, params in enumerate(SMALL.get(name, [{}]))]


@pytest.fixture(scope="module")
def qkv():
    return make_qkv(N=6, d=4, dv=2, norm=0.8, seed=1)


@pytest.mark.parametrize("name,params", cases())
def test_gradcheck(qkv, name, params):
    """Analytic gradients on a fixed draw match float64 finite differences (gradcheck's fast mode: the
    Jacobian against random directions, which any wrong or missing gradient term changes)."""
    est = registry.make_estimator(name, **params)
    draw = est.draw(*qkv[:2], replicates=1, generator=0)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in qkv)
    assert torch.autograd.gradcheck(lambda q, k, v: est(q, k, v, draw), inputs, fast_mode=True)


@pytest.mark.parametrize("name,params", cases())
def test_recorded_call_equals_the_in_place_one(qkv, name, params):
    """The call autograd records (out of place) gives the no-grad (in-place) output to float64 rounding."""
    est = registry.make_estimator(name, **params)
    draw = est.draw(*qkv[:2], replicates=2, generator=0)
    with torch.no_grad():
        plain = est(*qkv, draw)
    recorded = est(*(t.detach().clone().requires_grad_(True) for t in qkv), draw)
    assert recorded.requires_grad
    torch.testing.assert_close(recorded.detach(), plain, rtol=1e-13, atol=1e-13)
