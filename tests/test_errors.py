"""Bad input gets a ValueError/TypeError naming the argument, the value and what was expected."""
import pytest
import torch

import evalab as ev
from evalab import _checks
from conftest import make_qkv

ESTIMATORS = [ev.RFA(num_features=4), ev.EVA(window=4, chunk_size=2), ev.ControlVariates(num_features=4), ev.Softmax(),
              ev.RA(samples_per_query=2), ev.LARA(num_proposals=4)]
ESTIMATORS += [ev.Nystrom(num_landmarks=2), ev.LinearAttention(), ev.Scatterbrain(window=4, num_features=4),
               ev.LocalWindow(window=4)]


def _call(est, q, k, v):
    return est(q, k, v, est.draw(q, k, replicates=1, generator=0))


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_shape_and_type_errors(est):
    q, k, v = make_qkv(N=8, d=4, dv=3)
    with pytest.raises(ValueError, match="same feature size d"):
        _call(est, q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"v must have shape \(\*batch, M, dv\)"):
        _call(est, q, k, v[:5])
    with pytest.raises(ValueError, match="same batch dimensions"):
        _call(est, q.unsqueeze(0).expand(2, 8, 4), k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        _call(est, q.numpy(), k, v)
    with pytest.raises(TypeError, match="floating dtype"):
        _call(est, q.long(), k, v)
    with pytest.raises(ValueError, match=r"q must have shape \(\*batch, length, features\)"):
        _call(est, q[0], k, v)
    bad = k.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="k contains non-finite values"):
        _call(est, q, bad, v)
    bad = v.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="v contains non-finite values"):
        _call(est, q, k, bad)


def test_devices_must_match():
    """Devices are checked before any computation, so a meta tensor stands in for a second device."""
    q, k, v = make_qkv(N=8, d=4)
    with pytest.raises(ValueError, match="q and k must be on the same device, got q on cpu and k on meta"):
        ev.softmax_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="v must be on the same device as k"):
        ev.softmax_attention(q, k, v.to("meta"))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ev.RFA(num_features=0), "num_features must be >= 1, got 0"),
        (lambda: ev.RFA(num_features=2.5), "num_features must be an int"),
        (lambda: ev.RFA(feature_map="relu"), "feature_map='relu'.*'positive', 'hyperbolic', 'trig'"),
        (lambda: ev.RFA(sampler="sobol"), "sampler='sobol'.*'iid', 'orthogonal', 'qmc'"),
        (lambda: ev.RFA(eps=-1.0), "eps must be >= 0"),
        (lambda: ev.RFA(scale=0.0), "scale must be > 0"),
        (lambda: ev.RFA(feature_map="trig", eps=1e-3), "eps > 0 applies to positive-type"),
        (lambda: ev.ControlVariates(feature_map="trig"), "feature_map='trig'"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_draws():
    q, k, v = make_qkv(N=8, d=4)
    est = ev.RFA(num_features=4)
    with pytest.raises(ValueError, match="replicates must be >= 1"):
        est.draw(q, k, replicates=0)
    with pytest.raises(TypeError, match="generator must be"):
        est.draw(q, k, generator="seed")
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        ev.Draw([1, 2])


def test_large_finite_inputs_are_not_rejected():
    """Finiteness is checked through a sum first; a sum that overflows must not reject finite inputs."""
    q, k, v = make_qkv(N=8, d=4, dtype=torch.float32)
    big = torch.full_like(v, 3e38)  # finite, but its sum overflows float32
    assert torch.isinf(big.sum())
    _checks.qkv(q, k, big)
    half = torch.full((8, 3), 60000.0, dtype=torch.float16)  # its float16 sum would overflow too
    _checks.finite("v", half)
    for bad in (float("nan"), float("inf"), -float("inf")):
        worse = big.clone()
        worse[3, 1] = bad
        with pytest.raises(ValueError, match="v contains non-finite values"):
            _checks.qkv(q, k, worse)


def test_monte_carlo_rejects_non_finite_inputs():
    q, k, v = make_qkv(N=8, d=4)
    v[1, 0] = float("nan")
    with pytest.raises(ValueError, match="v contains non-finite values"):
        ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=4)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_empty_inputs(est):
    q, k, v = make_qkv(N=6, d=4, dv=3)
    with pytest.raises(ValueError, match=r"empty inputs: N=0 \(q \(0, 4\)"):
        _call(est, q[:0], k, v)
    with pytest.raises(ValueError, match=r"empty inputs: M=0 .*k \(0, 4\)"):
        _call(est, q, k[:0], v[:0])
    with pytest.raises(ValueError, match="empty inputs: M=0"):
        ev.monte_carlo(est, q, k[:0], v[:0], replicates=2)

