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


def test_key_variance_equals_the_variance_of_the_terms(monkeypatch):
    """Reference: the sample variance over draws of ghat from ControlVariates.terms (all R x N x M x dv at once),
    for one block, for blocks of one query and three replicates (key features made again per tile), and for
    tiles of 8 keys (two per row, the shared coefficient in value space across them)."""
    from evalab.measure import attribution
    q, k, v = make_qkv(N=9, M=14, d=4, dv=3, batch=(2,), norm=1.0, seed=4)
    R = 40
    _, draw = next(iter_draws(ev.ControlVariates(num_features=5), q, k, R, 1, R))
    kw = dict(num_features=5, chunk_size=4, replicates=R, seed=1)
    unblocked = ev.key_variance(q, k, v, **kw)
    # the results (2 x 9 x 14 float64, two rules) plus a little room
    blocked = ev.key_variance(q, k, v, **kw, batch=3, max_memory=2 * 2 * 9 * 14 * 8 + 60_000)
    assert attribution._Plan.of(2, 9, 14, 3, 5, 4, 3, R, 8, 2 * 2 * 9 * 14 * 8 + 60_000) == attribution._Plan(1, 14, 3, False, None)
    monkeypatch.setattr(attribution, "TILE_KEYS", 8)
    tiled = ev.key_variance(q, k, v, **kw)
    for label, est in _rules(4).items():
        reference = est.terms(q, k, v, draw).ghat.var(0).sum(-1)
        for result in (unblocked, blocked, tiled):
            torch.testing.assert_close(result.variance[label], reference, rtol=1e-10, atol=1e-14)
    assert float(unblocked.variance["optimal"].abs().max()) < 1e-24  # ghat_m = E[h_m] v_m for every draw (zero up to rounding)


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
    budget = 32_000  # one replicate of the estimates and its noise fits (about 10 kB), one of the 32 x 32 matrix work does not
    res = ev.monte_carlo(est, q, k, v, replicates=8, max_memory=budget)
    assert res.matrix_skipped == "over max_memory" and "row_kl" not in res.metrics
    full = ev.monte_carlo(est, q, k, v, replicates=8)
    assert res.mse.value == pytest.approx(full.mse.value, rel=1e-12) and "row_kl" in full.metrics
    with pytest.raises(MemoryError, match="pass matrix=False"):
        ev.monte_carlo(est, q, k, v, replicates=8, max_memory=budget, matrix=True)


def test_gaussian_refuses_inputs_over_max_memory():
    """The allocator is never asked: the estimate (3.3 TiB for seq_len 1e9, d 64) is refused in one line."""
    with pytest.raises(MemoryError, match=r"^inputs.gaussian with batch=\(\), seq_len=1000000000, key_len=1000000000, "
                                          r"d=64, dv=64 needs about 3.34e\+03 GiB, over max_memory=2 GiB; pass a smaller"):
        ev.inputs.gaussian(seq_len=10**9, d=64)
    # float64 q, k, v with their cast and one normalising temporary: 8 x 4 x 3 x 16 bytes + 8 x 4 x 8
    assert ev.inputs.synthetic.gaussian_bytes(seq_len=8, d=4, itemsize=8) == 8 * 4 * 3 * 16 + 8 * 4 * 8
    needed = ev.inputs.synthetic.gaussian_bytes(seq_len=8, d=4, itemsize=8)
    assert ev.inputs.gaussian(seq_len=8, d=4, max_memory=needed).q.shape == (8, 4)
    with pytest.raises(MemoryError, match="raise max_memory"):
        ev.inputs.gaussian(seq_len=8, d=4, max_memory=needed - 1)


def test_softmax_attention_refuses_before_allocating():
    """Output plus one block of logits: (N x dv + rows x M) x 8 bytes, with rows = all N queries here."""
    q, k, v = make_qkv(N=16, d=4, dv=3)
    needed = (16 * 3 + 16 * 16) * 8
    assert ev.estimators.softmax.softmax_bytes(N=16, M=16, dv=3, itemsize=8) == needed
    torch.testing.assert_close(ev.softmax_attention(q, k, v, max_memory=needed), ev.softmax_attention(q, k, v),
                               rtol=0, atol=0)
    with pytest.raises(MemoryError, match=r"^softmax_attention on batch x N x M x dv = 1 x 16 x 16 x 3 needs about "
                                          r".* GiB, over max_memory=.* GiB; pass fewer queries"):
        ev.softmax_attention(q, k, v, max_memory=needed - 1)


def test_monte_carlo_refuses_before_the_reference():
    """N = 2**19 queries with dv = 64: the per-group float64 sums alone are 22 x N x dv x 8 bytes (5.5 GiB), over
    the 2 GiB default; expanded (stride-0) inputs cost nothing, and the refusal comes before the exact reference."""
    N = 2**19
    q = torch.randn(1, 4, dtype=torch.float32).expand(N, 4)
    v = torch.randn(1, 64, dtype=torch.float32).expand(N, 64)
    with pytest.raises(MemoryError, match=r"^monte_carlo \(N=524288, M=524288, d=4, dv=64, batch=1, one replicate per "
                                          r"batch\) needs about .* GiB, over max_memory=2 GiB; shrink the inputs or "
                                          r"raise max_memory$"):
        ev.monte_carlo(ev.RFA(num_features=4), q, q, v, replicates=8)


def test_a_huge_sweep_is_refused_before_inputs_exist(tmp_path):
    """seq_len = 1e8, d = 16 in a spec (q, k, v built in float64 and cast to float32: 65.6 GiB): the CLI exits 2 with one line naming the size and max_memory_gb, without creating
    the output directory, and its process stays under 1 GiB of its own memory: the anonymous resident memory it
    ends with, and the growth of its peak RSS past its imports, are each under 1 GiB (the whole peak RSS also counts
    the shared libraries' file pages, torch's among them, which vary with the machine's page cache)."""
    import subprocess
    import sys
    from pathlib import Path

    spec = tmp_path / "huge.toml"
    spec.write_text('name = "huge"\nreplicates = 8\n[inputs]\nkind = "gaussian"\nseq_len = 100000000\nd = 16\n'
                    '[[estimators]]\nname = "rfa"\nnum_features = 8\n')
    out = tmp_path / "out"
    child = ("import resource, sys\nimport torch\nfrom evalab.cli import main\n"
             "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
             "    anon = [l.split()[1] for l in open('/proc/self/status') if l.startswith('RssAnon:')]\n"
             "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "    print('kib', peak - base, anon[0] if anon else 0, file=sys.stderr)\n"
             "sys.exit(code)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", child, "sweep", str(spec), "--out", str(out)], capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    error, rss = [line for line in proc.stderr.splitlines() if line.strip()]
    assert error.startswith("evalab sweep: error: cell 'rfa' (seq_len=100000000, d=16): its inputs need about 65.6 GiB, "
                            "over max_memory_gb=2 (the default); lower seq_len"), error
    growth, anon = (int(x) * 1024 for x in rss.split()[1:])  # KiB (ru_maxrss on Linux, /proc's RssAnon)
    assert growth < 2**30 and anon < 2**30, (growth, anon)
    assert not out.exists()


def test_a_sweep_cell_over_max_memory_gb_is_a_spec_error(tmp_path):
    """Inputs that fit (0.69 MiB) but a Monte-Carlo run that does not (the exact reference's logits, 4096 x 4096
    x 4 bytes) under max_memory_gb = 1 MiB: refused before the output directory exists, naming max_memory_gb."""
    from evalab.sweep import SpecError, run_sweep

    spec = {"name": "tight", "replicates": 4, "max_memory_gb": 2**-10,
            "inputs": {"kind": "gaussian", "seq_len": 4096, "d": 4}, "estimators": [{"name": "rfa", "num_features": 4}]}
    with pytest.raises(SpecError, match=r"^cell 'rfa' \(seq_len=4096, d=4\): monte_carlo \(N=4096, M=4096, d=4, dv=4, "
                                        r"batch=1, one replicate per batch\) needs about .* GiB, over "
                                        r"max_memory=0.000977 GiB; shrink the inputs or raise max_memory_gb$"):
        run_sweep(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
