"""Random features: every sampler gives an unbiased kernel estimate; orthogonal blocks are Haar.

Statistical checks use z-scores against |z| < 4.5 (two-sided false-positive rate about 7e-6 each) with fixed seeds.
"""
import math

import pytest
import torch

from evalab.estimators.features import kernel_estimate, log_features, num_columns, sample_omega, trig_features

Z_MAX = 4.5


def _axis_pair(d):
    """x, y with x + y close to e_1, where a non-Haar orthogonal construction is biased."""
    x = torch.zeros(d, dtype=torch.float64)
    y = torch.zeros(d, dtype=torch.float64)
    x[0], y[0], y[1] = 0.6, 0.6, 0.3
    return x, y


def _z(estimates, exact):
    return (estimates.mean().item() - exact) / (estimates.std().item() / math.sqrt(estimates.numel()))


@pytest.mark.parametrize("sampler", ["iid", "orthogonal", "qmc"])
@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic", "trig"])
def test_unbiased_kernel(sampler, feature_map):
    d, S = 16, 16
    x, y = _axis_pair(d)
    R = 800 if sampler == "qmc" else 20000
    omega = sample_omega(sampler, R, S, d, torch.Generator().manual_seed(1))
    k = kernel_estimate(x[None], y[None], omega, feature_map)[:, 0, 0]
    assert abs(_z(k, math.exp(float(x @ y)))) < Z_MAX


def test_raw_qr_orthogonal_is_biased():
    """The Haar correction matters: rows of a raw QR of a Gaussian matrix give a biased kernel (z about -20)."""
    d = S = 16
    R = 20000
    x, y = _axis_pair(d)
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(R, d, d, generator=g, dtype=torch.float64))
    norms = torch.randn(R, d, d, generator=g, dtype=torch.float64).norm(dim=-1)
    raw = q.transpose(-1, -2) * norms.unsqueeze(-1)
    k = kernel_estimate(x[None], y[None], raw, "positive")[:, 0, 0]
    assert _z(k, math.exp(float(x @ y))) < -Z_MAX


def test_orthogonal_blocks():
    d, S = 8, 20  # two full blocks and a partial one
    omega = sample_omega("orthogonal", 3, S, d, torch.Generator().manual_seed(0))
    assert omega.shape == (3, S, d)
    for block in (omega[:, :8], omega[:, 8:16], omega[:, 16:]):
        u = block / block.norm(dim=-1, keepdim=True)
        gram = u @ u.transpose(-1, -2)
        assert torch.allclose(gram, torch.eye(block.shape[1], dtype=torch.float64).expand_as(gram), atol=1e-12)


def test_orthogonal_row_norms_are_chi():
    """Row norms squared follow chi^2(d): mean d, variance 2d (z-tests, FPR about 1e-5)."""
    d, R = 8, 4000
    sq = sample_omega("orthogonal", R, d, d, torch.Generator().manual_seed(5)).norm(dim=-1).pow(2).flatten()
    assert abs((sq.mean().item() - d) / math.sqrt(2 * d / sq.numel())) < Z_MAX
    assert abs(sq.var().item() / (2 * d) - 1) < 0.1


def test_qmc_replicates_are_independent_scrambles():
    omega = sample_omega("qmc", 4, 8, 3, torch.Generator().manual_seed(0))
    assert not torch.allclose(omega[0], omega[1])
    # each replicate is a full Sobol set: its first coordinate's uniforms are stratified over 8 cells
    u = torch.special.ndtr(omega[:, :, 0])
    cells = (u * 8).floor()
    for r in range(4):
        assert sorted(cells[r].tolist()) == list(range(8))


def test_same_generator_seed_same_draw():
    a = sample_omega("iid", 2, 4, 3, torch.Generator().manual_seed(9))
    b = sample_omega("iid", 2, 4, 3, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic", "trig"])
def test_feature_columns(feature_map):
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    omega = torch.randn(4, 6, 3, dtype=torch.float64)
    f = trig_features(x, omega) if feature_map == "trig" else log_features(x, omega, feature_map)
    assert f.shape == (4, 2, 5, num_columns(feature_map, 6))


def test_log_features_float32_finite_at_norm_10():
    x = torch.randn(64, 32)
    x = 10 * x / x.norm(dim=-1, keepdim=True)
    omega = sample_omega("iid", 2, 128, 32, torch.Generator().manual_seed(0)).float()
    assert torch.isfinite(log_features(x, omega, "positive")).all()


def test_int_seeds_give_purpose_specific_streams():
    """An int seed is hashed with a purpose tag: inputs(seed=0) and draw(generator=0) never share a stream."""
    from evalab.estimators.draw import make_generator
    from evalab.inputs.synthetic import INPUTS_PURPOSE
    from evalab.estimators.draw import seeded_generator

    draw_stream = torch.randn(6, generator=make_generator(0))
    assert not torch.equal(draw_stream, torch.randn(6, generator=seeded_generator(0, INPUTS_PURPOSE)))
    assert not torch.equal(draw_stream, torch.randn(6, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(draw_stream, torch.randn(6, generator=make_generator(0)))
