"""softmax_attention (torch's fused kernel over query blocks) against the plain formula in float64."""
import math

import pytest
import torch

import evalab as ev
from conftest import make_qkv


def plain(q, k, v, scale=None, causal=False):
    """softmax(q k^T * scale) v in float64, every logit materialised."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_elements", [7, 100, 2**24])
def test_matches_plain_formula_in_float64(causal, block_elements):
    q, k, v = make_qkv(N=37, d=8, dv=5, batch=(2, 3), norm=2.0)
    ref = plain(q, k, v, causal=causal)
    out = ev.softmax_attention(q, k, v, causal=causal, block_elements=block_elements)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() < 1e-12


def test_cross_attention_and_scale():
    q, k, v = make_qkv(N=9, M=23, d=6, dv=2, norm=1.5)
    ref = plain(q, k, v, scale=0.3)
    assert (ev.softmax_attention(q, k, v, scale=0.3, block_elements=50) - ref).abs().max() < 1e-12


def test_large_logits_stay_finite():
    q, k, v = make_qkv(N=16, d=4, norm=30.0, dtype=torch.float32)  # logits up to 900
    out = ev.softmax_attention(q, k, v)
    assert torch.isfinite(out).all()
    ref = plain(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    q, k, v = make_qkv(N=20, d=8, dv=4, norm=1.0, dtype=dtype)
    out = ev.softmax_attention(q, k, v)
    assert out.dtype == dtype
    exact = ev.softmax_attention(q.double(), k.double(), v.double())
    # judged against the precision floor: the error of rounding the exact result to the half dtype
    floor = (exact.to(dtype).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * floor + 1e-6


def test_causal_needs_square():
    q, k, v = make_qkv(N=4, M=5)
    with pytest.raises(ValueError, match="causal"):
        ev.softmax_attention(q, k, v, causal=True)
