"""The cost model held to torch's own FLOP counter.

Every registered estimator's ``cost()`` must count the matrix products one call performs (what
``torch.utils.flop_counter.FlopCounterMode`` sees) and may add elementwise work the counter does not see
(exp, max, sums: documented in each cost docstring). At d = dv = 64 that elementwise work stays below
ELEMENTWISE_SHARE of the matrix products, so: counter <= model <= (1 + ELEMENTWISE_SHARE) x counter.
Deterministic; no statistical false positives.
"""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from evalab import registry

ELEMENTWISE_SHARE = 0.25
D = DV = 64
SIZES = (256, 512)
#: Variants beyond each registered class's defaults; estimators added to the registry join with their defaults.
VARIANTS = [
    ev.Softmax(causal=True),
    ev.RFA(num_features=256),
    ev.RFA(num_features=64, feature_map="hyperbolic"),
    ev.RFA(num_features=64, feature_map="trig"),
    ev.RFA(num_features=64, causal=True),
    ev.RFA(num_features=64, feature_map="hyperbolic", causal=True),
    ev.RFA(num_features=64, eps=1e-3),
    ev.EVA(samples_per_chunk=4),
    ev.EVA(window=0, chunk_size=16),
    ev.EVA(chunk_logit="exact"),
    ev.EVA(causal=True),
    ev.ControlVariates(num_features=64, coefficient="chunked", chunk_size=16),
    ev.ControlVariates(num_features=64, coefficient="optimal"),
]
ESTIMATORS = [cls() for cls in registry.ESTIMATORS.values()] + VARIANTS


def counted_flops(est, N, M, batch=()):
    """Matrix-product FLOPs torch counts in one call on float32 Gaussian inputs. Exact softmax runs torch's
    unfused (math) attention, whose products the counter sees; the fused CPU kernel is invisible to it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*batch, n, e, generator=g) for n, e in ((N, D), (M, D), (M, DV)))
    draw = est.draw(q, k, replicates=1, generator=0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        est(q, k, v, draw)
    return counter.get_total_flops()


def model_flops(est, N, M, batch=1):
    if isinstance(est, ev.Softmax) and est.causal:
        # the fused kernel skips the masked half (the model's count); the math path computes it and masks it
        est = dataclasses.replace(est, causal=False)
    return ev.estimate_cost(est, N=N, M=M, d=D, dv=DV, batch=batch).flops()


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_cost_model_matches_flop_counter(est, N):
    counted, model = counted_flops(est, N, N), model_flops(est, N, N)
    assert counted > 0, f"{est!r}: the counter saw no matrix product"
    assert counted <= model <= (1 + ELEMENTWISE_SHARE) * counted, (
        f"{est!r} at N = M = {N}, d = dv = {D}: model {model:.4g} FLOPs, counter {counted:.4g} "
        f"(ratio {model / counted:.3f}, expected within [1, {1 + ELEMENTWISE_SHARE}])"
    )


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
def test_rfa_matrix_products_counted_exactly(feature_map):
    """Non-causal RFA: the model's FLOPs less its elementwise term 4 (N + M) F are exactly the counted ones;
    hyperbolic features project once per draw (S directions, not 2S), batch dims included."""
    N, M, S = 96, 160, 32
    est = ev.RFA(num_features=S, feature_map=feature_map)
    elementwise = 4 * (N + M) * est.columns * 3
    assert counted_flops(est, N, M, batch=(3,)) == model_flops(est, N, M, batch=3) - elementwise
