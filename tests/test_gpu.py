"""CPU/GPU agreement (run with `pytest -m gpu`; skipped without CUDA).

Noise is drawn on the CPU from the same generator, so the GPU must reproduce the CPU numbers to float64
round-off, and float32 to a tolerance set by the float32-vs-float64 difference on the CPU (the precision floor).
"""
import pytest
import torch

import evalab as ev
from conftest import make_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ESTIMATORS = [
    ev.Softmax(), ev.Softmax(causal=True),
    ev.RFA(num_features=32), ev.RFA(num_features=32, causal=True), ev.RFA(num_features=32, feature_map="hyperbolic"),
    ev.RFA(num_features=32, feature_map="trig"), ev.RFA(num_features=32, sampler="orthogonal"),
    ev.RFA(num_features=32, sampler="qmc"), ev.RFA(num_features=32, eps=1e-4),
    ev.EVA(window=16, chunk_size=4), ev.EVA(window=16, chunk_size=4, samples_per_chunk=3, causal=True),
    ev.EVA(window=0, chunk_size=8, chunk_logit="exact", proposal="zero"),
    ev.ControlVariates(num_features=16, coefficient="chunked", chunk_size=4),
    ev.RA(samples_per_query=4), ev.RA(samples_per_query=2, causal=True, shared_noise=False),
    ev.LARA(num_proposals=8, weights="optimal", antithetic=True), ev.LARA(num_proposals=5, samples_per_proposal=2),
]


@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_estimators_agree(est):
    q, k, v = make_qkv(N=96, d=16, dv=8, batch=(2,), norm=1.2)
    draw = est.draw(q, k, replicates=4, generator=0)
    cpu64 = est(q, k, v, draw)
    gpu64 = est(q.cuda(), k.cuda(), v.cuda(), draw)
    assert gpu64.device.type == "cuda"
    assert (gpu64.cpu() - cpu64).abs().max() < 1e-10
    cpu32 = est(q.float(), k.float(), v.float(), draw)
    gpu32 = est(q.float().cuda(), k.float().cuda(), v.float().cuda(), draw)
    floor = (cpu32.double() - cpu64).abs().max()
    assert (gpu32.cpu().double() - cpu64).abs().max() <= 10 * floor + 1e-6


def test_monte_carlo_agrees():
    q, k, v = make_qkv(N=64, d=16, dv=8, norm=1.0)
    est = ev.EVA(window=16, chunk_size=4)
    cpu = ev.monte_carlo(est, q, k, v, replicates=200, seed=3)
    gpu = ev.monte_carlo(est, q.cuda(), k.cuda(), v.cuda(), replicates=200, seed=3)
    for name in cpu.metrics:
        assert gpu.metrics[name].value == pytest.approx(cpu.metrics[name].value, rel=1e-9, abs=1e-14)


def test_softmax_matches_sdpa_on_gpu():
    q, k, v = (t.cuda() for t in make_qkv(N=300, d=32, dv=16, batch=(2, 3), norm=2.0))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (ev.softmax_attention(q, k, v, causal=True) - ref).abs().max() < 1e-12
