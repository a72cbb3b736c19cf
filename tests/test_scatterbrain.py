"""Scatterbrain against a hand-written float64 formula on injected noise, and its identities with RFA and softmax."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evalab as ev
from conftest import make_qkv, scaled
from evalab.estimators.eva import CHUNK_LOGITS
from evalab.estimators import window as windows
from evalab.estimators.scatterbrain import Complement
from evalab.estimators.window import QUERY_BLOCK, span


def rf_kernel(x, y, omega, feature_map):
    """phi(x_n).phi(y_m) written out: (R, N, M)."""
    half = 0.5 * (x * x).sum(-1)[:, None] + 0.5 * (y * y).sum(-1)[None, :]
    px, py = x @ omega.transpose(-1, -2), y @ omega.transpose(-1, -2)  # (R, N, S), (R, M, S)
    kern = torch.exp(px.unsqueeze(-2) + py.unsqueeze(-3)).mean(-1)
    if feature_map == "hyperbolic":
        kern = 0.5 * (kern + torch.exp(-px.unsqueeze(-2) - py.unsqueeze(-3)).mean(-1))
    return kern * torch.exp(-half)


def in_support(n, m, window, support, causal=False):
    if window == 0:
        return False
    if support == "block":
        return m // window == n // window
    if causal:  # the window keys ending at n
        return 0 <= n - m < window
    return -(window // 2) <= m - n < (window + 1) // 2


def scatterbrain_reference(q, k, v, omega, window, support, feature_map, causal=False):
    """A_nm = exp(l_nm) on the support, phi(x_n).phi(y_m) elsewhere (causal: m <= n); Y = A v / A 1. float64."""
    x, y = scaled(q), scaled(k)
    N, M = x.shape[0], y.shape[0]
    mask = torch.tensor([[in_support(n, m, window, support, causal) for m in range(M)] for n in range(N)])
    a = torch.where(mask, torch.exp(x @ y.T), rf_kernel(x, y, omega, feature_map))
    if causal:
        a = a.tril()
    return a @ v / a.sum(-1, keepdim=True)


CASES = [("block", 8), ("block", 5), ("block", 12), ("sliding", 8), ("sliding", 7), ("block", 0)]


@pytest.mark.parametrize("support,window", CASES)
@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(support, window, feature_map, causal):
    N = QUERY_BLOCK + 9  # a full block of queries and a partial one
    q, k, v = make_qkv(N=N, d=4, dv=3, norm=1.0)
    est = ev.Scatterbrain(window=window, support=support, num_features=6, feature_map=feature_map, causal=causal)
    draw = est.draw(q, k, replicates=2, generator=0)
    out = est(q, k, v, draw)
    for r in range(2):
        ref = scatterbrain_reference(q, k, v, draw.noise[r], window, support, feature_map, causal)
        assert (out[r] - ref).abs().max() < 1e-10


def test_batched_inputs_match_per_element_calls():
    q, k, v = make_qkv(N=20, d=4, dv=2, batch=(2, 3), norm=1.0)
    est = ev.Scatterbrain(window=4, support="sliding", num_features=5)
    draw = est.draw(q, k, replicates=2, generator=1)
    out = est(q, k, v, draw)
    for i in range(2):
        for j in range(3):
            assert (out[:, i, j] - est(q[i, j], k[i, j], v[i, j], draw)).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_independent_noise_per_batch_element(causal):
    """shared_noise=False: noise (R, *b, S, d), and each batch element equals the formula on its own slice."""
    q, k, v = make_qkv(N=20, d=4, dv=2, batch=(2, 3), norm=1.0)
    est = ev.Scatterbrain(window=4, num_features=5, causal=causal, shared_noise=False, feature_map="hyperbolic")
    draw = est.draw(q, k, replicates=2, generator=5)
    assert draw.noise.shape == (2, 2, 3, 5, 4)
    assert est.noise_layout(q, k) == ev.RFA(num_features=5, shared_noise=False).noise_layout(q, k)
    out = est(q, k, v, draw)
    for i in range(2):
        for j in range(3):
            for r in range(2):
                ref = scatterbrain_reference(q[i, j], k[i, j], v[i, j], draw.noise[r, i, j], 4, "block", "hyperbolic", causal)
                assert (out[r, i, j] - ref).abs().max() < 1e-10
    assert (draw.noise[:, 0, 0] - draw.noise[:, 0, 1]).abs().max() > 0  # every batch element its own draw


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sampler", ["iid", "orthogonal"])
def test_empty_support_is_rfa_on_the_same_draw(causal, sampler):
    q, k, v = make_qkv(N=40, d=4, dv=3, batch=(2,), norm=1.2)
    est = ev.Scatterbrain(window=0, num_features=8, sampler=sampler, causal=causal, feature_map="hyperbolic")
    rfa = ev.RFA(num_features=8, sampler=sampler, causal=causal, feature_map="hyperbolic")
    assert (est.noise_kind, est.noise_layout(q, k)) == (rfa.noise_kind, rfa.noise_layout(q, k))
    draw = rfa.draw(q, k, replicates=3, generator=2)
    assert (est(q, k, v, draw) - rfa(q, k, v, draw)).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("support,window", [("block", 24), ("block", 50), ("sliding", 48)])
def test_full_support_is_softmax(support, window, causal):
    q, k, v = make_qkv(N=24, d=4, dv=3, norm=1.5)
    est = ev.Scatterbrain(window=window, support=support, num_features=4, causal=causal)
    out = est(q, k, v, est.draw(q, k, replicates=2, generator=3))
    assert (out - ev.softmax_attention(q, k, v, causal=causal)).abs().max() < 1e-12


@pytest.mark.skipif("rf" not in CHUNK_LOGITS, reason="EVA has no chunk_logit='rf' yet")
@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
def test_block_support_is_eva_with_rf_chunk_logits(chunk):
    """Scatterbrain (block window w) == EVA(window=w, disjoint chunks, zero proposal, chunk logit "rf") when every
    chunk uses the same omega draws: the chunk terms sum to the random-feature part over the whole complement."""
    w, S = 8, 6
    q, k, v = make_qkv(N=40, d=4, dv=3, norm=1.0)
    sb = ev.Scatterbrain(window=w, num_features=S)
    eva = ev.EVA(window=w, chunk_size=chunk, partition="disjoint", proposal="zero", samples_per_chunk=S,
                 chunk_logit="rf")
    draw = sb.draw(q, k, replicates=2, generator=6)
    C = eva.noise_layout(q, k)[0]
    eva_draw = ev.Draw(draw.noise.unsqueeze(1).expand(2, C, S, 4).contiguous(), eva.noise_kind)
    assert (sb(q, k, v, draw) - eva(q, k, v, eva_draw)).abs().max() < 1e-10


def test_common_random_numbers_with_rfa():
    """ev.compare sees Scatterbrain and RFA of the same features as sharing draws."""
    q, k, v = make_qkv(N=16, d=4, dv=2, norm=1.0)
    cmp = ev.compare({"rfa": ev.RFA(num_features=4), "sb": ev.Scatterbrain(window=4, num_features=4)}, q, k, v,
                     replicates=4, matrix=False)
    assert cmp.shared_draws["rfa", "sb"]


@pytest.mark.parametrize("support", ["block", "sliding"])
def test_float32_finite_and_accurate_at_large_norm(support):
    q, k, v = make_qkv(N=48, d=16, dv=4, norm=10.0, dtype=torch.float32)
    for causal in (False, True):
        est = ev.Scatterbrain(window=8, support=support, num_features=16, causal=causal)
        draw = est.draw(q, k, replicates=2, generator=4)
        out = est(q, k, v, draw)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out.double() - est(q.double(), k.double(), v.double(), draw)).abs().max() < 1e-4


@pytest.mark.parametrize("support,window,causal,feature_map", [
    ("block", 8, False, "positive"), ("sliding", 7, True, "hyperbolic"), ("sliding", 8, False, "hyperbolic"),
    ("block", 0, True, "positive"), ("block", 8, True, "positive"), ("block", 5, False, "positive")])
def test_cost_counts_the_matrix_products(support, window, causal, feature_map):
    """cost() minus its stated elementwise terms equals FlopCounterMode's matmul FLOPs, at N = M = 64, d = dv = 16."""
    N = M = 64
    d = dv = 16
    q, k, v = make_qkv(N=N, d=d, dv=dv, dtype=torch.float32)
    est = ev.Scatterbrain(window=window, support=support, num_features=8, feature_map=feature_map, causal=causal)
    draw = est.draw(q, k, replicates=1, generator=0)
    with FlopCounterMode(display=False) as counter:
        est(q, k, v, draw)
    F = est.columns
    elementwise = 0 if feature_map == "positive" else 2 * (N + M) * F  # negating and subtracting the half norm
    lo, hi = est.bounds(N, M)
    block = est.query_block()
    first, width = span(lo, hi, block)
    elementwise += 4 * len(first) * block * width * bool(window)
    geometry = Complement.of(lo, hi, block, M, causal)
    B, C, L, p = -(-N // block), geometry.tiles, block, geometry.reach
    # blocks padded to B x block queries, keys to C tiles of block keys, pairs to the furthest reach
    elementwise += (3 * C * L * F + 6 * C * F * dv + 4 * B * F * dv + 3 * B * (block + p) * F * (p > 0)
                    + 2 * B * block * p + 4 * B * block * (F + p))
    assert est.cost(N=N, M=M, d=d, dv=dv).flops() - elementwise == counter.get_total_flops()


def test_checks():
    with pytest.raises(ValueError, match="support='lsh'"):
        ev.Scatterbrain(support="lsh")
    with pytest.raises(ValueError, match="feature_map='trig'"):
        ev.Scatterbrain(feature_map="trig")
    q, k, v = make_qkv(N=6, M=8)
    est = ev.Scatterbrain(window=2, num_features=3)
    with pytest.raises(ValueError, match="window=2 needs self-attention"):
        est(q, k, v, est.draw(q, k))
    assert math.isfinite(float(ev.Scatterbrain(window=0, num_features=3)(q, k, v, est.draw(q, k)).sum()))


@pytest.mark.parametrize("window,support,causal,feature_map", [
    (2, "block", False, "positive"), (4, "sliding", True, "hyperbolic"), (0, "block", True, "positive"),
    (3, "sliding", False, "positive")])
def test_many_blocks_match_the_reference(monkeypatch, window, support, causal, feature_map):
    """With blocks of 3 queries (N = 7, d = 3, S = 2: several blocks and tiles, pairs inside them, states across
    them) on closed-form inputs and omega, the output equals the hand-written float64 formula to 1e-12 of
    max |v|."""
    monkeypatch.setattr(windows, "QUERY_BLOCK", 3)
    i = torch.arange(21, dtype=torch.float64).reshape(7, 3)
    q, k, v = torch.sin(0.7 * i + 0.3), torch.cos(1.3 * i), torch.sin(0.9 * i[:, :2] - 0.5)
    omega = torch.cos(2.1 * torch.arange(6, dtype=torch.float64) + 1.0).reshape(1, 2, 3)
    est = ev.Scatterbrain(window=window, support=support, causal=causal, feature_map=feature_map, num_features=2)
    out = est(q, k, v, ev.Draw(omega, est.noise_kind))[0]
    reference = scatterbrain_reference(q, k, v, omega[0], window, support, feature_map, causal)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12 * float(v.abs().max()))


def test_float32_large_norm_stays_finite_and_matches_float64():
    """At norm 4 (d = 64, logits in the hundreds) the log-space running sums stay finite in float32 and agree
    with float64 on the same draw to float32 accuracy."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (4 * torch.randn(1, 200, 64, generator=g, dtype=torch.float64) for _ in range(3))
    for window in (0, 16):
        est = ev.Scatterbrain(window=window, num_features=32)
        draw = est.draw(q, k, replicates=2, generator=0)
        exact = est(q, k, v, draw)
        fast = est(q.float(), k.float(), v.float(), draw)
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast.double(), exact, rtol=0, atol=1e-4 * float(v.abs().max()))
