"""``evalab bench``: what the estimators and the Monte-Carlo engine cost, measured side by side.

Sections: (a) the vectorised Monte-Carlo engine against the natural per-replicate loop; (b) the engine's
achieved FLOP/s (by the cost model) against a plain matmul measured in the same run; (c) forward time and peak
memory against sequence length, with log-log slopes; (d) evalab RFA against performer-pytorch's FastAttention
on the same projection matrix; (e) ``key_variance`` (per-(query, key) variance attribution): time and peak
memory; (f) ``model_gap`` in all-MiniLM-L6-v2 over 100 verses; (g) ``model_gap`` over 16 held-out passages of
512 tokens, 4 replicates, 2 threads (exact runs uncached, then cached); (h) start-up: ``evalab --help`` against
``python -c pass`` and ``import evalab`` against ``import torch``, each in a fresh interpreter; (i) Scatterbrain
against RFA of the same features, forward time ratio; (j) RFA and EVA no-grad forward peak memory at N = 16384;
(k) small-N Monte-Carlo throughput on CUDA; (l) ``fit``: Hedgehog fitted on all 6 x 12 heads of
all-MiniLM-L6-v2 at seq_len 512; (m) ``key_variance`` at scale (N = 8192, 64 replicates): time and peak memory. Prints a markdown table, writes bench.json, bench.md and bench.png
into ``out`` (default: a new folder under the user cache, :func:`default_out`).

Noise and signal: every timing goes through :func:`_time`, which returns a :class:`Timing` (a float, the median
over the repeats, that carries the repeats). :func:`run_bench` finds every Timing in the report, writes its spread
next to it (``<key>_timing``: min, quartiles, max, repeats, spread) and lists the timings whose spread is too wide
to trust; it also measures how busy the machine was (:class:`Load`). The markdown starts with these warnings, and
:func:`time_cell` prints a timing with its spread, so a new section gets both by timing through ``_time``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..measure.cost import estimate_cost
from ..estimators.draw import Draw
from ..estimators.eva import EVA
from ..estimators.linear import LinearAttention
from ..estimators.nystrom import Nystrom
from ..estimators.scatterbrain import Scatterbrain
from ..inputs import gaussian
from ..measure.monte_carlo import monte_carlo
from ..estimators.rfa import RFA
from ..estimators.softmax import Softmax, softmax_attention

D = 64
#: Columns of the roofline matmul (N, d) @ (d, FEATURE_COLUMNS): about the feature columns of one engine batch.
FEATURE_COLUMNS = 2048
#: Methods of section (c) besides SDPA, by seq_len (RFA also with the OPRF and SDERF maps at the same S).
#: EVA's cost is N (w + N / c) d with a fixed chunk size
#: (quadratic, with a small constant), linear with a fixed number of chunks.
SCALING = {
    "softmax": lambda N: Softmax(),
    "rfa": lambda N: RFA(num_features=256),
    "rfa_oprf": lambda N: RFA(num_features=256, feature_map="oprf"),  # same S: the cost of the parameters
    "rfa_sderf": lambda N: RFA(num_features=256, feature_map="sderf"),
    "rfa_hyperbolic": lambda N: RFA(num_features=128, feature_map="hyperbolic"),  # the same 256 feature columns
    "eva": lambda N: EVA(window=64, chunk_size=64),
    "eva_64_chunks": lambda N: EVA(window=0, chunk_size=max(1, N // 64)),
    "nystrom": lambda N: Nystrom(num_landmarks=64),
    "scatterbrain": lambda N: Scatterbrain(window=64, num_features=256),
    "elu+1": lambda N: LinearAttention(feature="elu"),
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one bench run: engine cases (N, R, naive R), scaling lengths, performer N, matmul n."""

    engine: tuple = ((128, 1000, 1000), (2048, 300, 30))
    lengths: tuple = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    slope_from: int = 4096
    performer_seq_len: int = 4096
    matmul_n: int = 2048
    memory: bool = True  # peak memory per forward (a fresh process per point on CPU)
    attribution_seq_len: int = 256  # (e): key_variance at N = M = this, d = 64, S = 64, chunk_size 16, R = 256
    model_texts: int = 100  # (f): model_gap over this many verses (0: skip)
    model_passages: int = 16  # (g): model_gap over this many held-out passages of 512 tokens (0: skip)
    fit_texts: int = 8  # (l): fit Hedgehog on this many training passages of 512 tokens (0: skip)
    fit_steps: int = 100  # (l): Adam steps, minibatches of 2 passages
    key_variance_seq_len: int = 8192  # (m): key_variance at N = M = this, 64 replicates (0: skip)
    repeats: int = 3  # timed repeats per measurement after a warm-up (2 from seq_len 16384 on in (c))


PLANS = {
    "full": Plan(),
    "quick": Plan(engine=((128, 1000, 200), (2048, 100, 10)), lengths=(1024, 2048, 4096, 8192), slope_from=1024,
                  performer_seq_len=1024, fit_texts=2, fit_steps=5, key_variance_seq_len=1024),
    "tiny": Plan(engine=((16, 8, 4),), lengths=(64, 128), slope_from=64, performer_seq_len=64, matmul_n=64,
                 memory=False, attribution_seq_len=16, model_texts=0, model_passages=0, repeats=2, fit_texts=0,
                 key_variance_seq_len=16),
}


#: A timing whose spread, (max - min) / median over its repeats, exceeds this is reported as too noisy to trust.
WIDE_SPREAD = 0.5
#: The machine counts as busy when other processes used more than this fraction of its cores during the run
#: (or, where /proc/stat is missing, when the 1-minute load average before the run exceeds it times the cores).
BUSY_SHARE = 0.25


class Timing(float):
    """Wall seconds of repeated calls: the float value is the median over ``times`` (the repeats, sorted).

    Multiplying or dividing by a plain number scales every repeat (a Timing again); any other arithmetic gives a
    plain float (a speed-up ``naive / engine`` is a float)."""

    times: tuple[float, ...]

    def __new__(cls, times) -> "Timing":
        times = tuple(sorted(float(t) for t in times))
        if not times:
            raise ValueError("times must hold at least one repeat, got none")
        self = super().__new__(cls, statistics.median(times))
        self.times = times
        return self

    def _scaled(self, factor):
        return Timing(t * factor for t in self.times)

    def __mul__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, Timing):
            return self._scaled(other)
        return float(self) * other

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, Timing):
            return self._scaled(1 / other)
        return float(self) / other

    def __reduce__(self):
        return Timing, (self.times,)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats; NaN for a single repeat (its spread is unknown)."""
        if len(self.times) < 2 or float(self) <= 0:
            return math.nan
        return (self.times[-1] - self.times[0]) / float(self)

    @property
    def wide(self) -> bool:
        """More than WIDE_SPREAD apart over the repeats: too noisy to trust."""
        return self.spread > WIDE_SPREAD

    def summary(self) -> dict:
        """min, first and third quartile, max, repeats and spread: the JSON beside the median."""
        q1, q3 = (statistics.quantiles(self.times, n=4, method="inclusive")[i] for i in (0, 2)) \
            if len(self.times) > 1 else (self.times[0], self.times[0])
        return {"min": self.times[0], "q1": q1, "q3": q3, "max": self.times[-1], "repeats": len(self.times),
                "spread": None if math.isnan(self.spread) else self.spread}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int = 3) -> Timing:
    """Wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call: a Timing (the median, with its
    repeats). Every timing of the bench goes through here, so that its spread is reported."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(times)


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot from /proc/stat, or None where it is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Load:
    """How busy the machine was around a measurement: the 1-minute load average before it and, on Linux, the
    share of all cores that *other* processes used while it ran (all CPU time from /proc/stat minus this
    process's and its children's)."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        self._stat, self._own, self._wall = _proc_stat(), _own_cpu(), time.perf_counter()

    def report(self) -> dict:
        """cores, load_before, others_share (NaN without /proc/stat), busy and a one-line reason when busy."""
        others = math.nan
        end = _proc_stat()
        wall = time.perf_counter() - self._wall
        if self._stat is not None and end is not None and wall > 0:
            others = max(0.0, (end[0] - self._stat[0]) - (_own_cpu() - self._own)) / (wall * self.cores)
        if not math.isnan(others):
            busy = others > BUSY_SHARE
            why = f"other processes used {others:.0%} of the {self.cores} cores during the run"
        else:
            busy = self.load_before > BUSY_SHARE * self.cores
            why = f"1-minute load average {self.load_before:.2f} on {self.cores} cores before the run"
        return {"cores": self.cores, "load_before": self.load_before,
                "others_share": None if math.isnan(others) else others, "busy": bool(busy),
                "reason": why if busy else None}


def _timings(node, path: str = ""):
    """(path, key, container, Timing) for every Timing value in a report's nested dicts and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        if isinstance(value, Timing):
            yield where.lstrip("."), key, node, value
        else:
            yield from _timings(value, where)


def spread_report(report: dict) -> list[str]:
    """Replace every Timing in ``report`` by its median (a plain float) with ``<key>_timing`` (its
    :meth:`Timing.summary`) beside it; return the paths of the timings whose spread exceeds WIDE_SPREAD."""
    wide = []
    for where, key, container, value in list(_timings(report)):
        container[key] = float(value)
        if isinstance(container, dict):
            container[f"{key}_timing"] = value.summary()
        if value.wide:
            wide.append(f"{where} ({value.spread:.0%})")
    return wide


def noisy(row: dict, *keys: str) -> bool:
    """Whether any of the timings ``keys`` of ``row`` (after :func:`spread_report`) is too wide to trust."""
    return any((row.get(f"{key}_timing") or {}).get("spread") is not None
               and row[f"{key}_timing"]["spread"] > WIDE_SPREAD for key in keys)


def time_cell(row: dict, key: str, scale: float = 1.0, unit: str = "") -> str:
    """A markdown cell for timing ``key`` of ``row``: the median (times ``scale``) and, after
    :func:`spread_report`, +-half its spread; "!" marks a spread wider than WIDE_SPREAD."""
    text = f"{row[key] * scale:.3g}{unit}"
    info = row.get(f"{key}_timing") or {}
    if info.get("spread") is not None:
        text += f" ±{info['spread'] / 2:.0%}" + (" !" if info["spread"] > WIDE_SPREAD else "")
    return text


def default_out(plan: str) -> Path:
    """Where a bench run writes by default: ``$XDG_CACHE_HOME/evalab/bench/<plan>-<date>-<time>`` (else under
    ``~/.cache``), outside any checkout."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "evalab" / "bench" / f"{plan}-{time.strftime('%Y%m%d-%H%M%S')}"


def _inputs(seq_len: int, device, batch=()):
    return tuple(gaussian(seq_len=seq_len, d=D, batch=batch, norm=1.0, dtype=torch.float32, device=device))


def naive_loop(estimator, q, k, v, replicates: int, seed: int = 0) -> float:
    """The natural notebook code: draw one replicate, call, accumulate the squared error; returns the mean error."""
    exact = softmax_attention(q, k, v)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(replicates):
        y = estimator(q, k, v, estimator.draw(q, k, replicates=1, generator=g))
        total += float(((y[0] - exact) ** 2).sum(-1).mean())
    return total / replicates


def matmul_flops(device, m: int, k: int, n: int) -> float:
    """FLOP/s of a float32 (m, k) @ (k, n) matmul on ``device``: the best of three medians (a ceiling)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    return 2 * m * k * n / min(_time(lambda: a @ b, device) for _ in range(3))


def bench_engine(device, plan: Plan) -> list[dict]:
    """(a) and (b): engine vs naive loop (timed on R_naive replicates, scaled to R); FLOP/s against a matmul of
    the engine's shape, (N, d) @ (d, FEATURE_COLUMNS) (the roofline), and against a square matmul (the peak)."""
    peak = matmul_flops(device, plan.matmul_n, plan.matmul_n, plan.matmul_n)
    rows = []
    for N, R, R_naive in plan.engine:
        q, k, v = _inputs(N, device)
        similar = matmul_flops(device, N, D, FEATURE_COLUMNS)
        for label, est in (("rfa S=64", RFA(num_features=64)), ("rfa S=256", RFA(num_features=256)),
                           ("eva w=32 c=8", EVA(window=32, chunk_size=8))):
            exact = softmax_attention(q, k, v)
            engine = _time(lambda: monte_carlo(est, q, k, v, replicates=R, reference=exact, matrix=False), device,
                           plan.repeats)
            naive = _time(lambda: naive_loop(est, q, k, v, R_naive), device, plan.repeats) * R / R_naive
            flops = estimate_cost(est, N=N, M=N, d=D, dv=D).flops(R)
            rows.append({"case": label, "seq_len": N, "replicates": R, "engine_s": engine, "naive_s": naive,
                         "speedup": naive / engine, "gflops": flops / engine / 1e9, "matmul_gflops": similar / 1e9,
                         "roofline_fraction": flops / engine / similar, "peak_gflops": peak / 1e9,
                         "peak_fraction": flops / engine / peak})
    return rows


def _forward(name: str, seq_len: int, device):
    """A zero-argument callable running one forward pass of ``name`` at ``seq_len`` (inputs (1, 1, N, 64):
    SDPA's fused CPU kernel needs the 4-D layout; 3-D inputs fall back to materialising N x N)."""
    q, k, v = _inputs(seq_len, device, batch=(1, 1))
    if name == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    est = SCALING[name](seq_len)
    draw = est.draw(q, k, replicates=1, generator=0)
    draw = Draw(draw.noise.to(device), draw.kind)
    return lambda: est(q, k, v, draw)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _in_fresh_process(worker, *args):
    """What ``worker(*args, conn)`` sends back over ``conn`` when run in a fresh (spawned) process."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(*args, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return value


def _peak_cpu_worker(name: str, seq_len: int, conn) -> None:
    fn = _forward(name, seq_len, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak-RSS counter (VmHWM) to the current RSS
        refs.write("5")
    before = _rss_kib("VmRSS")
    fn()
    conn.send((_rss_kib("VmHWM") - before) * 1024)


def peak_memory(name: str, seq_len: int, device) -> float:
    """Extra peak bytes of one forward pass: CUDA allocator statistics, or on CPU (Linux) the peak RSS of a fresh
    process above its RSS before the call."""
    if device.type == "cuda":
        fn = _forward(name, seq_len, device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    return float(_in_fresh_process(_peak_cpu_worker, name, seq_len))


def bench_scaling(device, plan: Plan) -> tuple[list[dict], dict]:
    """(c): forward time and peak memory vs seq_len; log-log slopes from ``plan.slope_from`` on."""
    lengths, lo = plan.lengths, plan.slope_from
    rows = []
    methods = ("softmax", "sdpa", *[name for name in SCALING if name != "softmax"])
    for name in methods:
        for N in lengths:
            seconds = _time(_forward(name, N, device), device, min(2, plan.repeats) if N >= 16384 else plan.repeats)
            peak = peak_memory(name, N, device) if plan.memory else None
            rows.append({"method": name, "seq_len": N, "seconds": seconds, "peak_bytes": peak})
    slopes = {}
    for name in methods:
        pts = [(r["seq_len"], r["seconds"]) for r in rows if r["method"] == name and r["seq_len"] >= lo]
        slopes[name] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
    sdpa = {r["seq_len"]: r["seconds"] for r in rows if r["method"] == "sdpa"}
    crossover = {}
    for name in methods[2:]:
        faster = [r["seq_len"] for r in rows if r["method"] == name and r["seconds"] < sdpa[r["seq_len"]]]
        crossover[name] = min(faster) if faster else None
    noisy_slopes = sorted({r["method"] for r in rows if r["seq_len"] >= lo and r["seconds"].wide})
    return rows, {"slopes": slopes, "slope_range": [lo, lengths[-1]], "crossover_vs_sdpa": crossover,
                  "noisy_slopes": noisy_slopes}


def bench_performer(device, plan: Plan) -> dict | None:
    """(d): evalab RFA vs performer-pytorch FastAttention (same projection, eps 1e-4), or None if not installed."""
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        return None
    S, N, heads = 256, plan.performer_seq_len, 8
    q, k, v = _inputs(N, device, batch=(1, heads))
    fast = FastAttention(dim_heads=D, nb_features=S, causal=False).to(device)
    ours = RFA(num_features=S, eps=1e-4)
    draw = Draw(fast.projection_matrix.unsqueeze(0).to(torch.float64), ours.noise_kind)
    theirs_s = _time(lambda: fast(q, k, v), device, plan.repeats)
    ours_s = _time(lambda: ours(q, k, v, draw), device, plan.repeats)
    diff = float((fast(q, k, v) - ours(q, k, v, draw)[0]).abs().max())
    return {"num_features": S, "seq_len": N, "heads": heads, "evalab_s": ours_s, "performer_s": theirs_s,
            "time_ratio": ours_s / theirs_s, "max_abs_diff": diff}


def _attribution(seq_len: int, replicates: int = 256) -> dict:
    """Run key_variance once on float32 Gaussian inputs, as every other row (N = M = seq_len, d = dv = 64,
    norm 1.5, S = 64, chunk_size 16): wall and CPU seconds."""
    from ..measure.attribution import key_variance

    q, k, v = gaussian(seq_len=seq_len, d=D, norm=1.5, seed=0, dtype=torch.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    key_variance(q, k, v, num_features=64, chunk_size=16, replicates=replicates)
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def _attribution_worker(seq_len: int, replicates: int, conn) -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak-RSS counter (VmHWM) to the current RSS
        refs.write("5")
    row = _attribution(seq_len, replicates)
    conn.send({**row, "peak_rss_bytes": _rss_kib("VmHWM") * 1024})


def _attribution_run(seq_len: int, replicates: int, memory: bool) -> dict:
    """One key_variance run (:func:`_attribution`), with ``memory`` in a fresh process whose peak RSS it adds."""
    if not memory:
        return {**_attribution(seq_len, replicates), "peak_rss_bytes": None}
    return _in_fresh_process(_attribution_worker, seq_len, replicates)


def bench_attribution(device, plan: Plan) -> dict:
    """(e): ``key_variance`` at N = plan.attribution_seq_len, d = 64, S = 64, chunk_size 16, 256 replicates, on the
    CPU: wall and CPU seconds, and (with ``plan.memory``, Linux) the peak RSS of a fresh process, imports included."""
    row = {"seq_len": plan.attribution_seq_len, "d": D, "num_features": 64, "chunk_size": 16, "replicates": 256}
    return {**row, **_attribution_run(plan.attribution_seq_len, 256, plan.memory)}


def bench_model(plan: Plan) -> dict | None:
    """(f): ``model_gap`` of EVA(window=8, chunk_size=4) in all-MiniLM-L6-v2 over ``plan.model_texts`` verses,
    2 replicates, on the CPU (one exact and two approximate forward passes per verse, each verse unpadded);
    None without the optional model packages or with model_texts = 0."""
    if not plan.model_texts:
        return None
    try:
        from ..measure.model_gap import model_gap
        model_gap(EVA(window=8, chunk_size=4), texts=3, replicates=2)  # loads the model (timed apart)
    except ImportError:
        return None
    start = time.perf_counter()
    res = model_gap(EVA(window=8, chunk_size=4), texts=plan.model_texts, replicates=2)
    return {"texts": plan.model_texts, "replicates": 2, "seconds": time.perf_counter() - start,
            "embedding_cosine": res.embedding_cosine.value}


PASSAGE_LEN = 512


def bench_model_passages(plan: Plan) -> dict | None:
    """(g): ``model_gap`` of EVA(window=32, chunk_size=8) in all-MiniLM-L6-v2 over ``plan.model_passages``
    held-out passages of 512 tokens, 4 replicates in one batched forward pass per passage, 2 threads, on the CPU:
    first with the exact model's runs not yet cached (one exact and one batched approximate pass per passage),
    then again with RFA(num_features=64) on the same passages (the exact runs come from the cache). None
    without the optional model packages or with model_passages = 0."""
    if not plan.model_passages:
        return None
    try:
        from ..measure.model_gap import clear_exact_cache, model_gap
        model_gap(EVA(window=32, chunk_size=8), texts=3, seq_len=16, replicates=2)  # loads the model (timed apart)
    except ImportError:
        return None
    clear_exact_cache()
    kwargs = dict(texts=plan.model_passages, seq_len=PASSAGE_LEN, split="heldout", replicates=4, threads=2)
    start = time.perf_counter()
    res = model_gap(EVA(window=32, chunk_size=8), **kwargs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    model_gap(RFA(num_features=64), **kwargs)
    warm = time.perf_counter() - start
    clear_exact_cache()
    return {"passages": plan.model_passages, "seq_len": PASSAGE_LEN, "replicates": 4, "threads": 2,
            "seconds": cold, "cached_seconds": warm, "embedding_cosine": res.embedding_cosine.value,
            "flops_fraction": res.flops_fraction}


#: (h): the start-up commands (report key -> what it runs in a fresh interpreter), and rounds of them per plan.
STARTUP = {"pass_s": "python -c pass", "help_s": "evalab --help", "import_evalab_s": "import evalab",
           "import_torch_s": "import torch", "first_use_s": "import evalab; ev.RFA"}
STARTUP_REPEATS = {"full": 10, "quick": 5, "tiny": 1}


def startup_commands() -> dict[str, list[str]]:
    """The argv of each STARTUP command; evalab --help is the console script beside this interpreter (``-m evalab``
    where there is none)."""
    script = Path(sys.executable).with_name("evalab")
    evalab = [str(script)] if script.is_file() else [sys.executable, "-m", "evalab"]
    code = {"pass_s": "pass", "import_evalab_s": "import evalab", "import_torch_s": "import torch",
            "first_use_s": "import evalab as ev; ev.RFA"}
    return {key: [*evalab, "--help"] if key == "help_s" else [sys.executable, "-c", code[key]] for key in STARTUP}


def bench_startup(repeats: int) -> dict:
    """(h): wall seconds of each STARTUP command over ``repeats`` rounds (the commands interleaved within a round,
    so a load that comes and goes touches all of them), and ``help_overhead_s``: the median of evalab --help
    minus that of python -c pass."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not supported; expected an int >= 1")
    commands = startup_commands()
    times = {key: [] for key in commands}
    for _ in range(repeats):
        for key, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[key].append(time.perf_counter() - start)
    row = {"repeats": repeats, **{key: Timing(t) for key, t in times.items()}}
    row["help_overhead_s"] = float(row["help_s"]) - float(row["pass_s"])
    return row


def bench_fit(plan: Plan, seq_len: int = 512) -> dict | None:
    """(l): ``evalab.fit`` of Hedgehog(d=32, feature_dim=32) with the attention cross-entropy on all 6 x 12 heads of
    all-MiniLM-L6-v2 (one set of parameters per layer and head) over ``plan.fit_texts`` training passages of
    ``seq_len`` tokens, ``plan.fit_steps`` Adam steps on minibatches of 2 passages, the held-out loss on 2
    held-out passages at the start and the end; on the CPU, captures loaded first (timed apart). None without
    the optional model packages or with fit_texts = 0."""
    if not plan.fit_texts:
        return None
    from ..estimators.learned import Hedgehog
    from ..inputs.minilm import minilm
    from ..measure.fit import fit

    try:
        train = minilm(seq_len, split="train", count=plan.fit_texts)
        heldout = minilm(seq_len, split="heldout", count=2)
    except ImportError:
        return None
    batch = min(2, plan.fit_texts)
    start = time.perf_counter()
    res = fit(Hedgehog(d=32, feature_dim=32), train, heldout=heldout, loss="attention", steps=plan.fit_steps,
              lr=0.02, seed=0, batch=batch, eval_every=max(plan.fit_steps, 1), progress=False)
    seconds = time.perf_counter() - start
    held = res.curve[res.curve["split"] == "heldout"]["loss"]
    return {"layers": train.q.shape[0], "heads": train.q.shape[2], "seq_len": seq_len, "texts": plan.fit_texts,
            "steps": plan.fit_steps, "batch": batch, "threads": torch.get_num_threads(), "seconds": seconds,
            "heldout_initial": float(held.iloc[0]), "heldout_final": float(held.iloc[-1])}


def warnings(report: dict) -> list[str]:
    """One line per reason to distrust the report's timings: a busy machine, timings too wide to trust."""
    out = []
    load = report.get("load") or {}
    if load.get("busy"):
        out.append(f"the machine was busy ({load['reason']}): timings, speed-ups and slopes may be off by a "
                   "large factor; rerun on an idle machine")
    wide = report.get("wide_timings") or []
    if wide:
        out.append(f"{len(wide)} timing(s) vary by more than {WIDE_SPREAD:.0%} of their median over their repeats "
                   f"(marked !; numbers derived from them are marked ? and are noise, not signal): "
                   + ", ".join(wide[:8]) + (", ..." if len(wide) > 8 else ""))
    return out


#: (i): Scatterbrain against RFA of the same features (S = 64, window 64), forward time, at these lengths
#: (those the plan's scaling lengths reach).
RATIO_LENGTHS = (4096, 16384)
#: (j): the lengths of the no-grad forward peak memory of RFA and EVA (the ``SCALING`` configurations).
NO_GRAD_MEMORY_LENGTH = 16384
#: (k): Monte-Carlo throughput at small N on CUDA (noise drawn on the device): (N, replicates).
SMALL_N_GPU = ((128, 1024), (512, 1024))


def bench_scatterbrain_ratio(device, plan: Plan) -> list[dict]:
    """(i): forward seconds of Scatterbrain(window=64, num_features=64) and RFA(num_features=64) on one draw,
    measured interleaved in one run (each the best of three alternating calls), and their ratio."""
    rows = []
    for N in [n for n in RATIO_LENGTHS if n <= plan.lengths[-1]] or list(plan.lengths[-1:]):
        q, k, v = _inputs(N, device, batch=(1, 1))
        rfa, sb = RFA(num_features=64), Scatterbrain(window=64, num_features=64)
        draw = rfa.draw(q, k, replicates=1, generator=0)
        draw = Draw(draw.noise.to(device), draw.kind)
        times = {"rfa": [], "scatterbrain": []}
        for name, est in (("rfa", rfa), ("scatterbrain", sb)):  # warm-up
            est(q, k, v, draw)
        for _ in range(3):
            for name, est in (("rfa", rfa), ("scatterbrain", sb)):
                times[name].append(float(_time(lambda: est(q, k, v, draw), device, 1)))
        rfa_s, sb_s = min(times["rfa"]), min(times["scatterbrain"])
        rows.append({"seq_len": N, "num_features": 64, "window": 64, "rfa_s": rfa_s, "scatterbrain_s": sb_s,
                     "ratio": sb_s / rfa_s})
    return rows


def bench_no_grad_memory(device, plan: Plan) -> list[dict]:
    """(j): peak memory of one no-grad forward pass (the in-place path) of the ``SCALING`` RFA and EVA at
    NO_GRAD_MEMORY_LENGTH (skipped without ``plan.memory``)."""
    if not plan.memory:
        return []
    N = NO_GRAD_MEMORY_LENGTH
    return [{"method": name, "seq_len": N, "peak_bytes": peak_memory(name, N, device)} for name in ("rfa", "eva")]


def bench_small_n_gpu(device, plan: Plan) -> list[dict] | None:
    """(k): replicates per second of ``monte_carlo`` at small N on CUDA, where drawing the noise on the device
    (no host draw and copy per block) sets the pace; None without CUDA."""
    if device.type != "cuda":
        return None
    rows = []
    for N, R in SMALL_N_GPU:
        q, k, v = _inputs(N, device)
        exact = softmax_attention(q, k, v)
        for label, est in (("rfa S=64", RFA(num_features=64)), ("eva w=32 c=8", EVA(window=32, chunk_size=8))):
            seconds = float(_time(lambda: monte_carlo(est, q, k, v, replicates=R, reference=exact, matrix=False), device, 1))
            rows.append({"case": label, "seq_len": N, "replicates": R, "seconds": seconds,
                         "replicates_per_s": R / seconds})
    return rows


#: (m): replicates of ``key_variance`` at scale (N = M = the plan's key_variance_seq_len, d = 64, S = 64, chunk_size 16).
KEY_VARIANCE_REPLICATES = 64


def bench_key_variance_scale(plan: Plan) -> dict | None:
    """(m): ``key_variance`` at N = plan.key_variance_seq_len, d = 64, S = 64, chunk_size 16, KEY_VARIANCE_REPLICATES
    replicates, on the CPU, run once (a warm-up would double minutes of work): wall and CPU seconds and (with
    ``plan.memory``, Linux) the peak RSS of a fresh process, imports included; None with key_variance_seq_len 0."""
    if not plan.key_variance_seq_len:
        return None
    row = {"seq_len": plan.key_variance_seq_len, "d": D, "num_features": 64, "chunk_size": 16,
           "replicates": KEY_VARIANCE_REPLICATES}
    return {**row, **_attribution_run(plan.key_variance_seq_len, KEY_VARIANCE_REPLICATES, plan.memory)}


def markdown_rows(report: dict) -> list[str]:
    """Markdown lines of sections (i), (j), (k) and (m)."""
    lines = []
    for r in report.get("scatterbrain_ratio") or []:
        lines.append(f"\nScatterbrain / RFA forward (S={r['num_features']}, window={r['window']}, N={r['seq_len']}, "
                     f"interleaved): {r['scatterbrain_s']:.3g}s / {r['rfa_s']:.3g}s = {r['ratio']:.2f}x")
    for r in report.get("no_grad_memory") or []:
        lines.append(f"\nno-grad forward peak memory, {r['method']} N={r['seq_len']}: {r['peak_bytes'] / 2**20:.0f} MiB")
    for r in report.get("small_n_gpu") or []:
        lines.append(f"\nmonte_carlo on the device, {r['case']} N={r['seq_len']} R={r['replicates']}: "
                     f"{r['seconds']:.3g}s ({r['replicates_per_s']:.0f} replicates/s)")
    if report.get("key_variance_scale"):
        lines.append(key_variance_line("key_variance at scale", report["key_variance_scale"], "CPU, one run"))
    return lines


def key_variance_line(title: str, r: dict, how: str) -> str:
    """The markdown line of a key_variance row (sections e and m)."""
    peak = "" if r["peak_rss_bytes"] is None else f", peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (whole process)"
    return (f"\n{title}, N={r['seq_len']}, d={r['d']}, S={r['num_features']}, chunk_size={r['chunk_size']}, "
            f"R={r['replicates']} ({how}): {r['seconds']:.3g}s wall, {r['cpu_seconds']:.3g}s CPU{peak}")


def markdown(report: dict) -> str:
    """The report as markdown: the warnings first, then the tables (timings as median ±half their spread)."""
    lines = [f"# evalab bench ({report['device']}, torch {report['torch']}, plan {report['plan']})", ""]
    load = report.get("load") or {}
    if load:
        others = load.get("others_share")
        lines.append(f"Machine: {load['cores']} cores, 1-minute load {load['load_before']:.2f} before the run"
                     + ("" if others is None else f", other processes used {others:.0%} of the cores during it")
                     + f". Timings: median over repeats, ± half their spread (max - min) / median.")
        lines.append("")
    for line in warnings(report):
        lines.append(f"**Warning:** {line}.")
    if lines[-1]:
        lines.append("")
    lines += [f"| case | N | R | engine s | naive loop s | speed-up | GFLOP/s | (N,{D})@({D},{FEATURE_COLUMNS}) GFLOP/s "
              "| roofline | square GFLOP/s | of square |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["engine"]:
        mark = " ?" if noisy(r, "engine_s", "naive_s") else ""
        lines.append(f"| {r['case']} | {r['seq_len']} | {r['replicates']} | {time_cell(r, 'engine_s')} | "
                     f"{time_cell(r, 'naive_s')} | {r['speedup']:.1f}x{mark} | {r['gflops']:.1f}{mark} | "
                     f"{r['matmul_gflops']:.1f} | {r['roofline_fraction']:.0%}{mark} | "
                     f"{r['peak_gflops']:.1f} | {r['peak_fraction']:.0%}{mark} |")
    lines += ["", "| method | " + " | ".join(str(n) for n in sorted({r['seq_len'] for r in report['scaling']})) + " | slope |",
              "|---|" + "---|" * (len({r['seq_len'] for r in report['scaling']}) + 1)]
    noisy_slopes = set(report["scaling_fit"].get("noisy_slopes", ()))
    for name, slope in report["scaling_fit"]["slopes"].items():
        cells = [time_cell(r, "seconds", unit="s") + (f" / {r['peak_bytes'] / 2**20:.0f}MiB" if r["peak_bytes"] is not None else "")
                 for r in report["scaling"] if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope:.2f}{' ?' if name in noisy_slopes else ''} |")
    lines.append(f"\nCrossover vs SDPA (first length where faster): {report['scaling_fit']['crossover_vs_sdpa']}")
    if report.get("performer"):
        p = report["performer"]
        lines.append(f"\nperformer-pytorch, S={p['num_features']}, N={p['seq_len']}, heads={p['heads']}: evalab "
                     f"{time_cell(p, 'evalab_s', unit='s')}, performer {time_cell(p, 'performer_s', unit='s')}, ratio "
                     f"{p['time_ratio']:.2f}{' ?' if noisy(p, 'evalab_s', 'performer_s') else ''}, "
                     f"max |diff| {p['max_abs_diff']:.2g}")
    if report.get("attribution"):
        lines.append(key_variance_line("key_variance", report["attribution"], "CPU"))
    if report.get("startup"):
        st = report["startup"]
        cells = ", ".join(f"{what} {time_cell(st, key, unit=' s')}" for key, what in STARTUP.items())
        lines.append(f"\nstart-up, median of {st['repeats']} fresh interpreters: {cells}; evalab --help is "
                     f"{st['help_overhead_s']:.3f} s above python -c pass")
    if report.get("model"):
        m = report["model"]
        lines.append(f"\nmodel_gap, EVA(window=8, chunk_size=4) in all-MiniLM-L6-v2, {m['texts']} verses, "
                     f"{m['replicates']} replicates (CPU): {m['seconds']:.3g}s (embedding cosine {m['embedding_cosine']:.3f})")
    if report.get("model_passages"):
        m = report["model_passages"]
        lines.append(f"\nmodel_gap, EVA(window=32, chunk_size=8) in all-MiniLM-L6-v2, {m['passages']} held-out passages of "
                     f"{m['seq_len']} tokens, {m['replicates']} replicates, {m['threads']} threads (CPU): {m['seconds']:.3g}s; "
                     f"RFA(num_features=64) on the same passages, exact runs cached: {m['cached_seconds']:.3g}s "
                     f"(EVA: embedding cosine {m['embedding_cosine']:.3f} at {m['flops_fraction']:.2f}x softmax's FLOPs)")
    lines += markdown_rows(report)
    if report.get("fit"):
        f = report["fit"]
        lines.append(f"\nfit, Hedgehog(feature_dim=32) on all-MiniLM-L6-v2's {f['layers']} x {f['heads']} heads, seq_len "
                     f"{f['seq_len']}, {f['texts']} passages, {f['steps']} steps of {f['batch']} (CPU, {f['threads']} "
                     f"threads): {f['seconds']:.3g}s ({f['seconds'] / max(f['steps'], 1):.3g}s a step); held-out "
                     f"cross-entropy {f['heldout_initial']:.3f} -> {f['heldout_final']:.3f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Forward time vs seq_len, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    colours, markers = plt.get_cmap("tab20").colors, "os^vD<>ph*X"
    for i, name in enumerate(report["scaling_fit"]["slopes"]):  # a colour (tab20's dark shades, then its light
        style = dict(color=colours[2 * i % 20 + i // 10 % 2], marker=markers[i % len(markers)])  # ones) and a marker each
        pts = [r for r in report["scaling"] if r["method"] == name]
        label = f"{name} (slope {report['scaling_fit']['slopes'][name]:.2f})"
        spread = [r.get("seconds_timing") or {} for r in pts]  # error bars: min to max over the repeats
        yerr = [[r["seconds"] - t.get("min", r["seconds"]) for r, t in zip(pts, spread)],
                [t.get("max", r["seconds"]) - r["seconds"] for r, t in zip(pts, spread)]]
        ax[0].errorbar([r["seq_len"] for r in pts], [r["seconds"] for r in pts], yerr=yerr, capsize=2, label=label,
                       **style)
        if all(r["peak_bytes"] is not None for r in pts):
            ax[1].loglog([r["seq_len"] for r in pts], [max(r["peak_bytes"], 1) / 2**20 for r in pts], **style)
    ax[0].set(xscale="log", yscale="log", xlabel="seq_len", ylabel="forward seconds (bars: min to max)",
              title=f"time ({report['device']})" + (", busy machine" if (report.get("load") or {}).get("busy") else ""))
    ax[1].set(xlabel="seq_len", ylabel="peak MiB", title="peak memory")
    fig.legend(*ax[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_bench(*, plan: str = "full", device: str = "cpu", out: str | Path | None = None) -> dict:
    """Run every section of ``plan`` (full | quick | tiny); write bench.json, bench.md, bench.png under ``out``
    (default :func:`default_out`, outside the checkout; the report's ``out`` says where). Every Timing in the
    report becomes its median with ``<key>_timing`` beside it; ``load`` and ``wide_timings`` say how far to
    trust them (:func:`warnings`)."""
    if plan not in PLANS:
        raise ValueError(f"plan={plan!r} is not known; expected one of {', '.join(map(repr, PLANS))}")
    load = Load()
    dev, sizes = torch.device(device), PLANS[plan]
    report = {"evalab": __version__, "torch": torch.__version__, "device": str(dev), "plan": plan, "sizes": asdict(sizes),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    report["engine"] = bench_engine(dev, sizes)
    report["scaling"], report["scaling_fit"] = bench_scaling(dev, sizes)
    report["performer"] = bench_performer(dev, sizes)
    report["attribution"] = bench_attribution(dev, sizes)
    report["model"] = bench_model(sizes)
    report["model_passages"] = bench_model_passages(sizes)
    report["startup"] = bench_startup(STARTUP_REPEATS[plan])
    report["scatterbrain_ratio"] = bench_scatterbrain_ratio(dev, sizes)
    report["no_grad_memory"] = bench_no_grad_memory(dev, sizes)
    report["small_n_gpu"] = bench_small_n_gpu(dev, sizes)
    report["fit"] = bench_fit(sizes)
    report["key_variance_scale"] = bench_key_variance_scale(sizes)
    report["load"] = load.report()
    report["wide_timings"] = spread_report(report)
    out = default_out(plan) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["out"] = str(out.resolve())
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report) + "\n")
    plot(report, out / "bench.png")
    return report
