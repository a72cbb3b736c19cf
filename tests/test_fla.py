"""evalab's maps equal flash-linear-attention's feature-map modules on the same weights, to float32 precision,
with every convention that differs named (skipped where fla is not installed: pip name flash-linear-attention)."""
import dataclasses
import warnings

import pytest
import torch

import evalab as ev
from conftest import make_qkv
from evalab.estimators import feature_maps as fm

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fla warns that Triton falls back to the CPU
    feature_map = pytest.importorskip("fla.modules.feature_map")

D = 8


def fla_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 11, D, generator=g)  # (batch, heads, length, d), float32


def close(a, b):
    return (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


def test_taylor_equals_fla():
    """fla's TaylorFeatureMap acts on raw q and divides by d^1/4 (first order) and sqrt d (second order) itself:
    evalab's taylor on x = d^-1/4 q (scale d^-1/2), in the same feature order."""
    q = fla_inputs(1)
    assert close(fm.taylor(q * D**-0.25), feature_map.TaylorFeatureMap(D)(q))


@pytest.mark.parametrize("nu", [1, 4])
def test_dpfp_equals_fla(nu):
    x = fla_inputs(2)
    assert close(fm.dpfp(x, nu), feature_map.DPFPFeatureMap(D, nu=nu)(x))


def test_hedgehog_equals_fla():
    """fla's HedgehogFeatureMap is one softmax over [2u, -2u] (variant "joint_softmax"), u = W x + b with
    W (d, d) initialised to the identity and b to 0, as evalab's Hedgehog default."""
    module = feature_map.HedgehogFeatureMap(D)
    init = ev.Hedgehog(d=D, feature_dim=D, variant="joint_softmax")
    assert torch.equal(module.layer.weight.detach(), init.q_weight) and torch.equal(module.layer.bias.detach(), init.q_bias)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.layer.weight.copy_(torch.randn(D, D, generator=g))
        module.layer.bias.copy_(torch.randn(D, generator=g))
    x = fla_inputs(4)
    ours = fm.hedgehog(x, module.layer.weight.detach(), module.layer.bias.detach(), "joint_softmax")
    assert close(ours, module(x).detach())


def test_t2r_equals_fla():
    """fla's T2RFeatureMap has no bias by default (evalab's b = 0) and nn.Linear's uniform initialisation."""
    module = feature_map.T2RFeatureMap(D, 6)
    x = fla_inputs(5)
    ours = fm.t2r(x, module.layer.weight.detach(), torch.zeros(6))
    assert close(ours, module(x).detach())


def test_fla_modules_as_estimators():
    """The adapter on fla's modules (raw inputs) gives evalab's estimators on the same weights."""
    q, k, v = make_qkv(N=40, d=D, dv=3, batch=(2,), norm=1.5, seed=6, dtype=torch.float32)
    taylor = ev.FeatureMapAttention(feature_map.TaylorFeatureMap(D), window=8, causal=True)
    native = ev.LinearAttention(feature="taylor", window=8, causal=True)
    assert close(taylor(q, k, v, taylor.draw(q, k)), native(q, k, v, native.draw(q, k)))

    fq, fk = feature_map.HedgehogFeatureMap(D), feature_map.HedgehogFeatureMap(D)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (fq, fk):
            module.layer.weight.add_(0.3 * torch.randn(D, D, generator=g))
    hh = ev.Hedgehog(d=D, feature_dim=D, variant="joint_softmax")
    hh = dataclasses.replace(hh, q_weight=fq.layer.weight.detach().clone(), k_weight=fk.layer.weight.detach().clone())
    # fla maps raw q; evalab's learned maps act on scaled x: the same when the weights absorb d^-1/4
    wrapped = ev.FeatureMapAttention(fq, fk)
    scaled = dataclasses.replace(hh, q_weight=hh.q_weight * D**0.25, k_weight=hh.k_weight * D**0.25)
    with torch.no_grad():
        assert close(wrapped(q, k, v, wrapped.draw(q, k)), scaled(q, k, v, scaled.draw(q, k)))


def test_rebased_equals_fla():
    """fla's RebasedFeatureMap: layer norm (epsilon 1e-5), then [z_i^2 / sqrt d, z_i z_j sqrt(2/d)], evalab's
    order. Its fused layer norm with learned weight and bias needs Triton on a GPU; without them it runs on CPU and
    equals evalab's map at weight 1, bias 0 (the released initialisation)."""
    module = feature_map.RebasedFeatureMap(D, use_gamma=False, use_beta=False)
    x = fla_inputs(8)
    assert close(fm.rebased(x, torch.ones(D), torch.zeros(D)), module(x))
