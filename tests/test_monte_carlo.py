"""The Monte-Carlo engine against its definitions (docs/theory.md section 6), with fixed seeds."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import evalab as ev
from conftest import make_qkv
from evalab.measure.monte_carlo import iter_draws


@dataclass(frozen=True)
class Shifted:
    """A test estimator with known moments: Y + bias + sigma * N(0, I), so mse = bias^2 dv + sigma^2 dv."""

    bias: float = 0.0
    sigma: float = 0.1
    noise_kind = "gauss"

    def noise_layout(self, q, k):
        return (q.shape[-2], 3)

    def draw(self, q, k, *, replicates=1, generator=None):
        return ev.Draw(torch.randn(replicates, *self.noise_layout(q, k), generator=generator, dtype=torch.float64), "gauss")

    def __call__(self, q, k, v, draw):
        return ev.softmax_attention(q, k, v) + self.bias + self.sigma * draw.noise


@pytest.fixture(scope="module")
def small():
    return make_qkv(N=10, d=4, dv=3, batch=(2,), norm=1.2, seed=3)


def _stacked(est, q, k, v, R, seed):
    """All R estimates at once, from the same draws the engine uses."""
    return torch.cat([est(q, k, v, d) for _, d in iter_draws(est, q, k, R, seed, R)])


@pytest.mark.parametrize("est", [ev.RFA(num_features=8), ev.EVA(window=4, chunk_size=2), ev.RFA(num_features=4, feature_map="trig")],
                         ids=["rfa", "eva", "trig"])
def test_metrics_follow_definitions(small, est):
    q, k, v = small
    R = 150
    res = ev.monte_carlo(est, q, k, v, replicates=R, seed=4)
    y = _stacked(est, q, k, v, R, 4)
    exact = ev.softmax_attention(q, k, v)
    ybar = y.mean(0)
    mse = ((y - exact) ** 2).sum(-1).mean(0)
    var = ((y - ybar) ** 2).sum(-1).sum(0) / (R - 1)
    bias2 = ((ybar - exact) ** 2).sum(-1) - var / R
    for name, ref in [("mse", mse), ("variance", var), ("bias2", bias2)]:
        assert torch.allclose(res.per_query[name], ref, rtol=1e-9, atol=1e-14), name
        assert res.metrics[name].value == pytest.approx(float(ref.mean()), rel=1e-9, abs=1e-14)
        assert res.metrics[f"rel_{name}"].value == pytest.approx(float(ref.mean() / (exact**2).sum(-1).mean()), rel=1e-9, abs=1e-14)
    frame = res.per_query_frame()  # one row per (batch index, query), same values
    assert len(frame) == 20 and list(frame.columns[:2]) == ["batch0", "query"]
    assert frame.mse.to_numpy() == pytest.approx(mse.reshape(-1).numpy(), rel=1e-9, abs=1e-14)
    # mse = variance + bias2 exactly, per query and in aggregate
    assert torch.allclose(res.per_query["mse"], res.per_query["variance"] + res.per_query["bias2"], rtol=1e-12, atol=1e-15)
    rel = ((y - exact) ** 2).sum((-1, -2, -3)).sqrt() / (exact**2).sum().sqrt()
    assert res.rel_error.value == pytest.approx(float(rel.mean()), rel=1e-12)
    assert res.rel_error_median.value == pytest.approx(float(rel.median()) if R % 2 else float(np.median(rel.numpy())), rel=1e-12)
    for name, m in res.metrics.items():
        if math.isfinite(m.value):
            assert m.low <= m.value <= m.high, name


def test_independent_of_batch_size(small):
    q, k, v = small
    est = ev.RFA(num_features=8)
    big = ev.monte_carlo(est, q, k, v, replicates=200, seed=1)
    for budget in (1e5, 1.5e5):  # batches of a few replicates, not aligned with the noise blocks
        tiny = ev.monte_carlo(est, q, k, v, replicates=200, seed=1, max_memory=budget)
        for name in big.metrics:
            assert tiny.metrics[name].value == pytest.approx(big.metrics[name].value, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(tiny.rel_error_samples, big.rel_error_samples, rtol=1e-12)


def test_replicates_are_a_prefix(small):
    q, k, v = small
    est = ev.EVA(window=4, chunk_size=2)
    a = ev.monte_carlo(est, q, k, v, replicates=70, seed=2)
    b = ev.monte_carlo(est, q, k, v, replicates=150, seed=2)
    np.testing.assert_allclose(a.rel_error_samples, b.rel_error_samples[:70], rtol=1e-12)


def test_seed_changes_draws(small):
    q, k, v = small
    est = ev.RFA(num_features=8)
    a = ev.monte_carlo(est, q, k, v, replicates=20, seed=0)
    b = ev.monte_carlo(est, q, k, v, replicates=20, seed=1)
    assert not np.allclose(a.rel_error_samples, b.rel_error_samples)


def test_bias2_correction_is_unbiased():
    """With zero true bias, the corrected bias2 averages to 0 while |Ybar - Y|^2 averages to variance / R.

    300 independent runs; z-test |z| < 4.5 (false-positive rate about 7e-6)."""
    q, k, v = make_qkv(N=6, d=4, dv=3, norm=1.0)
    est = Shifted(bias=0.0, sigma=0.5)
    R, runs = 10, 300
    values = np.array([ev.monte_carlo(est, q, k, v, replicates=R, seed=s, matrix=False).bias2.value for s in range(runs)])
    assert abs(values.mean()) / (values.std(ddof=1) / math.sqrt(runs)) < 4.5
    naive = values + 3 * 0.25 / R  # add back variance / R: the uncorrected estimator is biased upward
    assert naive.mean() / (values.std(ddof=1) / math.sqrt(runs)) > 10
    biased = np.array([ev.monte_carlo(Shifted(bias=0.2, sigma=0.5), q, k, v, replicates=R, seed=s, matrix=False).bias2.value for s in range(runs)])
    assert abs(biased.mean() - 3 * 0.04) / (biased.std(ddof=1) / math.sqrt(runs)) < 4.5


def test_interval_coverage():
    """95% intervals for mse and variance cover the truth in about 95% of 200 runs.

    Accept 0.88..0.995 (a binomial(200, 0.95) count falls outside with probability < 1e-4)."""
    q, k, v = make_qkv(N=4, d=4, dv=3, norm=1.0)
    est = Shifted(bias=0.1, sigma=0.3)
    truth = {"mse": 3 * (0.01 + 0.09), "variance": 3 * 0.09}
    hits = {name: 0 for name in truth}
    runs = 200
    for s in range(runs):
        res = ev.monte_carlo(est, q, k, v, replicates=200, seed=s, matrix=False)
        for name, value in truth.items():
            hits[name] += res.metrics[name].low <= value <= res.metrics[name].high
    for name, count in hits.items():
        assert 0.88 <= count / runs <= 0.995, (name, count)


def test_matrix_metrics(small):
    q, k, v = small
    est = ev.RFA(num_features=8)
    res = ev.monte_carlo(est, q, k, v, replicates=64, seed=0)
    eye = torch.eye(10, dtype=torch.float64).expand(2, 10, 10)
    a_hat = _stacked(est, q, k, eye, 64, 0)
    a = ev.softmax_attention(q, k, eye)
    fro = ((a_hat - a) ** 2).sum((-1, -2, -3)).sqrt() / (a**2).sum().sqrt()
    kl = (a * (a.log() - a_hat.log())).sum(-1).mean((-1, -2))
    tv = 0.5 * (a_hat - a).abs().sum(-1).mean((-1, -2))
    assert res.matrix_rel_error.value == pytest.approx(float(fro.mean()), rel=1e-10)
    assert res.row_kl.value == pytest.approx(float(kl.mean()), rel=1e-10)
    assert res.row_tv.value == pytest.approx(float(tv.mean()), rel=1e-10)
    trig = ev.monte_carlo(ev.RFA(num_features=8, feature_map="trig"), q, k, v, replicates=64, seed=0)
    assert "negative entries" in trig.matrix_skipped and "row_kl" not in trig.metrics
    local = ev.monte_carlo(ev.EVA(window=4, chunk_size=0), q, k, v, replicates=4, seed=0)
    assert local.row_kl.value == math.inf  # window-only attention puts no mass outside the window


def test_compare_common_random_numbers(small):
    q, k, v = small
    cmp = ev.compare({"rfa": ev.RFA(num_features=8), "cv": ev.ControlVariates(num_features=8),
                      "orth": ev.RFA(num_features=8, sampler="orthogonal")}, q, k, v, replicates=100)
    d = cmp.difference("cv", "rfa", "mse")  # the shared coefficient is RFA: identical on shared draws
    assert abs(d.value) < 1e-12 and d.high - d.low < 1e-10
    table = cmp.differences()
    assert set(table.name) == {"cv", "orth"}
    assert table[table.name == "cv"].shared_draws.all() and not table[table.name == "orth"].shared_draws.any()
    frame = cmp.to_frame()
    assert list(frame.name) == ["rfa", "cv", "orth"] and "mse_low" in frame


def test_to_frame_columns(small):
    q, k, v = small
    frame = ev.monte_carlo(ev.EVA(window=4, chunk_size=2), q, k, v, replicates=10).to_frame()
    assert frame.loc[0, "estimator"] == "eva" and frame.loc[0, "window"] == 4
    for name in ("mse", "variance", "bias2", "rel_mse", "rel_variance", "rel_bias2", "rel_error", "rel_error_median", "rel_error_p90"):
        assert {name, f"{name}_low", f"{name}_high"} <= set(frame.columns)
    assert frame.loc[0, "flops"] > 0 and frame.loc[0, "seq_len"] == 10


def test_bad_arguments(small):
    q, k, v = small
    est = ev.RFA(num_features=8)
    with pytest.raises(ValueError, match="replicates must be >= 2"):
        ev.monte_carlo(est, q, k, v, replicates=1)
    with pytest.raises(ValueError, match="reference must have shape"):
        ev.monte_carlo(est, q, k, v, replicates=4, reference=torch.zeros(3))
    with pytest.raises(MemoryError, match=r"monte_carlo \(N=10, .*one replicate per batch\) needs about .* raise max_memory"):
        ev.monte_carlo(est, q, k, v, replicates=4, max_memory=100)
    with pytest.raises(ValueError, match="at least two"):
        ev.compare({"a": est}, q, k, v, replicates=4)


def test_per_batch_frame_and_attention_matrix():
    q, k, v = make_qkv(N=8, d=4, dv=3, batch=(2, 3), norm=1.0)
    est = ev.RFA(num_features=8)
    res = ev.monte_carlo(est, q, k, v, replicates=32, seed=0)
    frame = res.per_batch_frame()
    assert len(frame) == 6 and set(frame.batch0) == {0, 1} and set(frame.batch1) == {0, 1, 2}
    exact = ev.softmax_attention(q, k, v)
    for row in frame.itertuples():
        mse = res.per_query["mse"][row.batch0, row.batch1].mean()
        assert row.rel_mse == pytest.approx(float(mse / (exact[row.batch0, row.batch1] ** 2).sum(-1).mean()), rel=1e-12)
    # the frame's mean over equal-sized batch elements is the aggregate
    assert frame.mse.mean() == pytest.approx(res.mse.value, rel=1e-12)
    draw = est.draw(q, k, replicates=2, generator=0)
    a = ev.attention_matrix(est, q, k, draw)
    assert a.shape == (2, 2, 3, 8, 8)
    assert torch.allclose(a @ v, est(q, k, v, draw), atol=1e-12)


def test_batch_size_rules():
    """Batches are cache-sized, grow to amortise per-call deterministic work, and never exceed max_memory."""
    from evalab.measure.cost import Cost
    from evalab.measure.monte_carlo import CPU_WORKING_SET, batch_size

    quarter = CPU_WORKING_SET / 4
    assert batch_size(Cost(0.0, 1e6, 0.0, quarter), 1000, 2**40) == 4  # four replicates fill the working set
    assert batch_size(Cost(100e6, 1e6, 0.0, quarter), 1000, 2**40) == 64  # 100 to amortise, rounded to the block
    assert batch_size(Cost(100e6, 1e6, 0.0, quarter), 1000, 3 * quarter) == 2  # memory cap wins, power of two
    assert batch_size(Cost(0.0, 1e6, 0.0, 1.0), 50, 2**40) == 50  # everything in one batch
    assert batch_size(Cost(0.0, 1e6, 0.0, quarter), 1000, 2**40, device="cuda") == 128  # 1 GiB on accelerators
    with pytest.raises(MemoryError, match="one replicate needs"):
        batch_size(Cost(0.0, 1e6, 0.0, quarter), 10, quarter / 2)


def test_progress_shows_the_reference_and_the_replicates(capsys):
    """progress=True draws a bar for the exact reference (query blocks) and one for the replicates, each with its
    count and a rate/ETA field from the first update; progress=False prints nothing."""
    q, k, v = make_qkv(N=16, d=4, dv=3)
    ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=70, progress=True)
    err = capsys.readouterr().err
    assert "exact softmax attention:   0%" in err and "exact softmax attention: 100%" in err and "16/16" in err
    assert "monte_carlo rfa: 100%" in err and "70/70" in err and "replicate/s" in err
    assert "<" in err.split("monte_carlo rfa")[-1]  # tqdm's [elapsed<remaining] ETA field
    ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=70)
    assert capsys.readouterr().err == ""
    ev.softmax_attention(q, k, v, progress=True, block_elements=64)  # 4 queries per block
    err = capsys.readouterr().err
    assert "exact softmax attention:   0%" in err and "0/16" in err  # shown before the first block ends
    assert "16/16" in err
