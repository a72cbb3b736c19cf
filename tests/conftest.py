import math

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (tiny tensors, many small ops: thread hand-offs cost more than
    they give on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_qkv(N=12, M=None, d=4, dv=3, batch=(), norm=0.8, seed=0, dtype=torch.float64):
    """Random q, k, v whose scaled rows have norm about ``norm`` (scale d**-0.5)."""
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    root = d**0.25  # q = x / sqrt(scale) with scale = d**-0.5
    q = torch.randn(*batch, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, M, d, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True) * norm * root
    k = k / k.norm(dim=-1, keepdim=True) * norm * root
    v = torch.randn(*batch, M, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def scaled(t, scale=None):
    s = t.shape[-1] ** -0.5 if scale is None else scale
    return t * math.sqrt(s)



def assert_independent_noise_per_element(est, q, k, v, replicates=2, tol=1e-12):
    """``est`` has shared_noise=False: its noise carries q's batch axes after R, batch elements get different
    noise, and one call equals the per-element calls of the shared-noise estimator on the noise slices."""
    import dataclasses
    import itertools

    import evalab as ev

    batch = tuple(q.shape[:-2])
    draw = est.draw(q, k, replicates=replicates, generator=3)
    assert draw.noise.shape[1 : 1 + len(batch)] == batch
    out = est(q, k, v, draw)
    shared = dataclasses.replace(est, shared_noise=True)
    elements = list(itertools.product(*map(range, batch)))
    for index in elements:
        slot = (slice(None), *index)
        ref = shared(q[index], k[index], v[index], ev.Draw(draw.noise[slot], draw.kind))
        assert (out[slot] - ref).abs().max() < tol, f"batch element {index}"
    first, second = (draw.noise[(slice(None), *i)] for i in elements[:2])
    assert not torch.equal(first, second), "batch elements drew the same noise"
