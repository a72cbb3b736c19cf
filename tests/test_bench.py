"""Benchmark code paths at tiny sizes (no timing assertions), and the cost model against hand counts."""
import json
import math

import pytest
import torch

import evalab as ev
from evalab.measure.cost import estimate_cost
from evalab.report import bench
from evalab.report.bench import SCALING, Timing, naive_loop, run_bench


def test_bench_tiny_plan_writes_report(tmp_path):
    report = run_bench(plan="tiny", out=tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["plan"] == "tiny" and len(saved["engine"]) == 3
    assert (tmp_path / "bench.png").stat().st_size > 0 and "| rfa S=256 |" in (tmp_path / "bench.md").read_text()
    assert set(report["scaling_fit"]["slopes"]) == {"sdpa", *SCALING}
    for row in report["engine"]:  # the engine's FLOP/s over a matmul of its shape and over a square one
        assert row["roofline_fraction"] * row["matmul_gflops"] == pytest.approx(row["gflops"])
        assert row["peak_fraction"] * row["peak_gflops"] == pytest.approx(row["gflops"])
        est = {"rfa S=64": ev.RFA(num_features=64), "rfa S=256": ev.RFA(num_features=256),
               "eva w=32 c=8": ev.EVA(window=32, chunk_size=8)}[row["case"]]
        flops = estimate_cost(est, N=row["seq_len"], M=row["seq_len"], d=64, dv=64).flops(row["replicates"])
        assert row["gflops"] * 1e9 * row["engine_s"] == pytest.approx(flops)  # FLOP/s by the cost model
    assert saved["attribution"]["seq_len"] == 16 and saved["attribution"]["seconds"] > 0
    assert saved["out"] == str(tmp_path.resolve())
    for row in saved["engine"] + saved["scaling"]:  # every timing carries its repeats' spread
        for key in [k for k in row if k in ("engine_s", "naive_s", "seconds")]:
            t = row[f"{key}_timing"]
            assert t["repeats"] == 2 and t["min"] <= t["q1"] <= row[key] <= t["q3"] <= t["max"]
            assert t["spread"] == pytest.approx((t["max"] - t["min"]) / row[key], rel=1e-12)
    assert set(saved["load"]) == {"cores", "load_before", "others_share", "busy", "reason"}
    wide = saved["wide_timings"]  # "path (spread%)", each path naming a timing of the report
    for entry in wide:
        path, spread = entry.rsplit(" (", 1)
        node = saved
        for part in path.replace("]", "").replace("[", ".").split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert isinstance(node, float) and float(spread.rstrip("%)")) > 100 * bench.WIDE_SPREAD - 1
    text = (tmp_path / "bench.md").read_text()
    assert "Timings: median over repeats" in text and (("**Warning:**" in text) == bool(wide or saved["load"]["busy"]))
    assert "key_variance, N=16" in (tmp_path / "bench.md").read_text()
    kv = saved["key_variance_scale"]
    assert kv["seq_len"] == 16 and kv["replicates"] == 64 and kv["seconds"] > 0 and "key_variance at scale, N=16" in text
    if report["performer"] is not None:  # same projection, same stabiliser: agreement to float32 precision
        assert report["performer"]["max_abs_diff"] < 1e-5


def test_bench_rejects_unknown_plan(tmp_path):
    with pytest.raises(ValueError, match="plan='huge'"):
        run_bench(plan="huge", out=tmp_path)


def test_naive_loop_agrees_with_engine_mse():
    """The naive loop and the engine estimate the same mse (different draws: agreement within 5 standard errors)."""
    q, k, v = ev.inputs.gaussian(seq_len=16, d=8, norm=1.0)
    est = ev.RFA(num_features=8)
    naive = naive_loop(est, q, k, v, 400, seed=0)
    res = ev.monte_carlo(est, q, k, v, replicates=400, seed=1, matrix=False)
    se = (res.mse.high - res.mse.low) / (2 * 2.1)
    assert abs(naive - res.mse.value) < 5 * math.sqrt(2) * se


N, M, d, dv = 12, 10, 4, 3


@pytest.mark.parametrize(
    "est,expected",
    [
        # softmax: logits 2NMd, weights @ v 2NMdv, 4 elementwise per logit
        (ev.Softmax(), N * M * (2 * d + 2 * dv + 4)),
        # RFA positive, S = 5: projections 2(N+M)Sd (+ 2MS: -|y|^2/2 folded into the key GEMM), averages and
        # mixture 2(N+M)S dv, 4(N+M)S elementwise
        (ev.RFA(num_features=5), 2 * 22 * 5 * 4 + 2 * 10 * 5 + 2 * 22 * 5 * 3 + 4 * 22 * 5),
        # hyperbolic doubles the feature columns but not the projections
        (ev.RFA(num_features=5, feature_map="hyperbolic"), 2 * 22 * 5 * 4 + 2 * 22 * 10 * 3 + 4 * 22 * 10),
    ],
)
def test_cost_matches_hand_count(est, expected):
    c = estimate_cost(est, N=N, M=M, d=d, dv=dv)
    assert c.flops(1) == expected


def test_eva_cost_hand_count():
    """EVA w=4, c=2, S_c=1 on N = M = 12: window 2 N w (d + dv) + 4 N w; chunk logits 2 N C d + 2 M d (fixed);
    per replicate 2 M d + 4 M + 2 M dv (chunk averages) + 2 N C dv (mixture), C = 6."""
    est = ev.EVA(window=4, chunk_size=2)
    c = estimate_cost(est, N=12, M=12, d=d, dv=dv)
    fixed = 12 * 4 * (2 * d + 2 * dv + 4) + 2 * 12 * 6 * d + 2 * 12 * d
    per = 2 * 12 * d + 4 * 12 + 2 * 12 * dv + 2 * 12 * 6 * dv
    assert (c.fixed_flops, c.replicate_flops) == (fixed, per)
    assert c.flops(10) == fixed + 10 * per
    # batch dims and itemsize scale linearly
    c2 = estimate_cost(est, N=12, M=12, d=d, dv=dv, batch=3, itemsize=8)
    assert c2.flops(1) == 3 * c.flops(1) and c2.bytes(1) == 6 * c.bytes(1)


def test_unknown_estimator_cost_is_nan():
    class Custom:
        pass

    c = estimate_cost(Custom(), N=4, M=4, d=2, dv=2)
    assert math.isnan(c.flops(1)) and c.bytes(1) == 4 * 4 * 2


def test_peak_memory_of_a_forward_pass():
    """A fresh process measures the extra peak RSS of one forward pass: RFA's (N, F) log-features (2 x 8 MiB at
    N = 8192, S = 256) must show up, and softmax must stay far below its 256 MiB logits matrix."""
    from evalab.report.bench import peak_memory

    assert 16 * 2**20 < peak_memory("rfa", 8192, torch.device("cpu")) < 200 * 2**20
    assert peak_memory("softmax", 8192, torch.device("cpu")) < 64 * 2**20


def test_timing_is_the_median_with_its_repeats():
    t = Timing([0.3, 0.1, 0.2, 0.2])
    assert float(t) == 0.2 and t.times == (0.1, 0.2, 0.2, 0.3)  # exact: the median of two equal repeats and the repeats, sorted
    assert t.spread == pytest.approx((0.3 - 0.1) / 0.2, rel=1e-12) and t.wide  # 100% > WIDE_SPREAD (50%)
    summary = t.summary()
    assert (summary["min"], summary["max"], summary["repeats"]) == (0.1, 0.3, 4)  # exact: repeats selected, not computed
    assert summary["q1"] == pytest.approx(0.175, rel=1e-12) and summary["q3"] == pytest.approx(0.225, rel=1e-12)
    scaled = t * 10 / 4  # scaling by a number scales every repeat and keeps the spread
    assert isinstance(scaled, Timing) and scaled.times == pytest.approx((0.25, 0.5, 0.5, 0.75), rel=1e-12)
    assert scaled.spread == pytest.approx(t.spread, rel=1e-12)
    ratio = t / Timing([0.1])  # a ratio of two timings is a plain number
    assert type(ratio) is float and ratio == pytest.approx(2.0, rel=1e-12)
    assert math.isnan(Timing([0.5]).spread) and not Timing([0.5]).wide  # one repeat: spread unknown
    assert not Timing([1.0, 1.1, 1.2]).wide
    with pytest.raises(ValueError, match="at least one repeat"):
        Timing([])


def test_spread_report_replaces_timings_and_lists_the_wide_ones():
    report = {"engine": [{"engine_s": Timing([1.0, 1.1, 1.2]), "naive_s": Timing([1.0, 3.0, 2.0])}],
              "performer": {"evalab_s": Timing([0.5, 0.5])}, "other": 3.0}
    wide = bench.spread_report(report)
    row = report["engine"][0]
    assert type(row["engine_s"]) is float and row["engine_s"] == 1.1  # exact: the median repeat, selected
    assert row["naive_s_timing"]["spread"] == pytest.approx(1.0, rel=1e-12)
    assert wide == ["engine[0].naive_s (100%)"]
    assert bench.noisy(row, "engine_s", "naive_s") and not bench.noisy(row, "engine_s")
    assert bench.time_cell(row, "engine_s", unit="s") == "1.1s ±9%"
    assert bench.time_cell(row, "naive_s") == "2 ±50% !"
    json.dumps(report)  # plain JSON after the replacement


def test_load_counts_other_processes_cpu(monkeypatch):
    """Busy when other processes used more than BUSY_SHARE of the cores: all CPU time minus this process's."""
    stats = iter([(100.0, 1000.0), (112.0, 1020.0), (100.0, 1000.0), (103.0, 1020.0)])
    own = iter([0.0, 2.0, 0.0, 2.0])
    monkeypatch.setattr(bench, "_proc_stat", lambda: next(stats))
    monkeypatch.setattr(bench, "_own_cpu", lambda: next(own))
    for others_cpu, busy in ((10.0, True), (1.0, False)):
        load = bench.Load()
        load.cores, load._wall = 2, load._wall - 10.0  # 10 s of wall time on 2 cores
        report = load.report()
        assert report["others_share"] == pytest.approx(others_cpu / 20, rel=1e-3) and report["busy"] is busy
        assert (report["reason"] is None) is (not busy)


def test_default_out_is_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = bench.default_out("quick")
    assert out.parent == tmp_path / "evalab" / "bench" and out.name.startswith("quick-")
