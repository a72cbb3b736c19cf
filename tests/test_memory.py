"""Memory budgets where a quadratic tensor can appear: blocked results equal the unblocked ones, and a budget
too small for one block raises a MemoryError that says what is needed."""
import dataclasses

import pytest
import torch

import evalab as ev
from evalab.measure.monte_carlo import iter_draws
from conftest import make_qkv


def _rules(chunk_size):
    base = ev.ControlVariates(num_features=5)
    return {"shared": base,
            f"chunked ({chunk_size})": dataclasses.replace(base, coefficient="chunked", chunk_size=chunk_size),
            "optimal": dataclasses.replace(base, coefficient="optimal")}


def test_key_variance_equals_the_variance_of_the_terms():
    """Reference: the sample variance over draws of ghat from ControlVariates.terms (all R x N x M x dv at once)."""
    q, k, v = make_qkv(N=9, M=14, d=4, dv=3, batch=(2,), norm=1.0, seed=4)
    R = 40
    _, draw = next(iter_draws(ev.ControlVariates(num_features=5), q, k, R, 1, R))
    unblocked = ev.key_variance(q, k, v, num_features=5, chunk_size=4, replicates=R, seed=1)
    # one query and three replicates per block: the results (2 x 9 x 14 x 3 float64) plus a little room
    blocked = ev.key_variance(q, k, v, num_features=5, chunk_size=4, replicates=R, seed=1, batch=3,
                              max_memory=3 * 2 * 9 * 14 * 8 + 40_000)
    for label, est in _rules(4).items():
        reference = est.terms(q, k, v, draw).ghat.var(0).sum(-1)
        torch.testing.assert_close(unblocked.variance[label], reference, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(blocked.variance[label], reference, rtol=1e-10, atol=1e-14)
    assert float(unblocked.variance["optimal"].abs().max()) == 0.0  # ghat_m = E[h_m] v_m for every draw


def test_key_variance_memory_error():
    q, k, v = make_qkv(N=16, d=4, dv=3)
    with pytest.raises(MemoryError, match=r"key_variance needs about .* GiB .* raise max_memory"):
        ev.key_variance(q, k, v, num_features=4, chunk_size=4, replicates=4, max_memory=10_000)


def test_terms_memory_error():
    q, k, v = make_qkv(N=16, d=4, dv=3)
    est = ev.ControlVariates(num_features=4)
    draw = est.draw(q, k, replicates=8, generator=0)
    assert est.terms(q, k, v, draw, max_memory=3 * 8 * 16 * 16 * 3 * 8).ghat.shape == (8, 16, 16, 3)
    with pytest.raises(MemoryError, match=r"R x N x M x dv = 8 x 16 x 16 x 3 .* fewer replicates"):
        est.terms(q, k, v, draw, max_memory=3 * 8 * 16 * 16 * 3 * 8 - 1)


@pytest.mark.parametrize("est", [ev.RFA(num_features=6), ev.EVA(window=4, chunk_size=2)], ids=["RFA", "EVA"])
def test_attention_matrix_in_column_blocks(est):
    """Blocks of one-hot value columns give the same matrix; A @ v is the estimate (linearity in v)."""
    q, k, v = make_qkv(N=10, d=4, dv=3, batch=(2,), norm=1.0)
    draw = est.draw(q, k, replicates=3, generator=0)
    whole = ev.attention_matrix(est, q, k, draw)
    result = 3 * 2 * 10 * 10 * 8
    blocked = ev.attention_matrix(est, q, k, draw, max_memory=result + est.cost(N=10, M=10, d=4, dv=2, batch=2,
                                                                               itemsize=8).bytes(3) + 2 * 10 * 2 * 8)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(whole @ v.unsqueeze(0), est(q, k, v, draw), rtol=1e-12, atol=1e-12)
    with pytest.raises(MemoryError, match=r"attention_matrix needs about .* R x N x M = 3 x 10 x 10"):
        ev.attention_matrix(est, q, k, draw, max_memory=result)


def test_matrix_metrics_within_max_memory():
    """A default run skips the matrix metrics that do not fit (and says so); matrix=True raises instead."""
    q, k, v = make_qkv(N=32, d=4, dv=3)
    est = ev.RFA(num_features=4)
    budget = 30_000  # one replicate of the estimates fits (about 10 kB), one of the 32 x 32 matrix work does not
    res = ev.monte_carlo(est, q, k, v, replicates=8, max_memory=budget)
    assert res.matrix_skipped == "over max_memory" and "row_kl" not in res.metrics
    full = ev.monte_carlo(est, q, k, v, replicates=8)
    assert res.mse.value == pytest.approx(full.mse.value, rel=1e-12) and "row_kl" in full.metrics
    with pytest.raises(MemoryError, match="pass matrix=False"):
        ev.monte_carlo(est, q, k, v, replicates=8, max_memory=budget, matrix=True)
