"""Running sweeps: store contents, resume after SIGKILL, failure isolation, grid edits, load_results, CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import evalab
from evalab import monte_carlo
from evalab.cli import main
from evalab.estimators.registry import make_estimator
from evalab.inputs.kinds import make_inputs
from evalab.sweep import load_results, parse_spec, run_sweep
from evalab.sweep import runner
from evalab.sweep.spec import render_toml

ROOT = Path(__file__).resolve().parents[1]
# columns that legitimately differ between two runs of the same cell
VOLATILE = ("wall_seconds", "finished_at", "host", "spec_hash", "spec_name")


def tiny() -> dict:
    return {
        "name": "tiny",
        "replicates": 8,
        "seed": 0,
        "inputs": {"kind": "gaussian", "seq_len": 16, "d": 8, "norm": [0.5, 1.0]},
        "estimators": [
            {"name": "rfa", "label": "RFA", "num_features": [4, 8]},
            {"name": "eva", "label": "EVA", "window": 8, "chunk_size": 4},
        ],
    }


def stable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by cell id, without the columns that record when/where a cell ran."""
    return df.drop(columns=[c for c in VOLATILE if c in df]).set_index("cell_id").sort_index()


def test_rows_match_a_direct_monte_carlo_call(tmp_path):
    summary = run_sweep(tiny(), tmp_path, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (6, 0, 0) and summary.out == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "cells", "spec.toml", "specs"]
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 6
    spec = parse_spec((tmp_path / "spec.toml").read_text())
    assert (tmp_path / "specs" / f"{spec.hash}.toml").read_text() == render_toml(spec.to_dict())
    df = load_results(tmp_path, spec=True)
    assert list(df["label"]) == ["RFA"] * 4 + ["EVA"] * 2  # spec order: block by block
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    assert set(df["norm"]) == {0.5, 1.0} and (df["inputs"] == "gaussian").all()  # exact: spec values, stored
    assert (df["dtype"] == "float32").all() and (df["device"] == "cpu").all()
    assert (df["evalab_version"] == evalab.__version__).all() and (df["torch_version"] == torch.__version__).all()
    assert (df["spec_name"] == "tiny").all() and (df["spec_hash"] == spec.hash).all()
    assert (df["seq_len"] == 16).all() and (df["dv"] == 8).all() and (df["replicates"] == 8).all()
    assert (df["scale"] == 8**-0.5).all() and (df["input_scale"] == 8**-0.5).all()
    # cells on the same input share the input seed and the Monte-Carlo seed
    assert df.groupby("norm")[["seed", "input_seed"]].nunique().eq(1).all().all()

    row = df[(df["label"] == "RFA") & (df["num_features"] == 8) & (df["norm"] == 1.0)].iloc[0]
    qkv = make_inputs("gaussian", seq_len=16, d=8, norm=1.0, seed=int(row["input_seed"]), dtype=torch.float32)
    est = make_estimator("rfa", num_features=8, scale=qkv.scale)
    direct = monte_carlo(est, *qkv, replicates=8, seed=int(row["seed"])).to_frame().iloc[0]
    for name in ("mse", "mse_low", "variance", "bias2_high", "rel_error", "rel_error_p90", "row_kl", "flops"):
        assert row[name] == direct[name], name


def test_results_do_not_depend_on_block_or_axis_order(tmp_path):
    shuffled = tiny()
    shuffled["estimators"].reverse()
    shuffled["estimators"][1]["num_features"] = [8, 4]
    shuffled["inputs"]["norm"] = [1.0, 0.5]
    run_sweep(tiny(), tmp_path / "a", progress=False)
    run_sweep(shuffled, tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(stable(load_results(tmp_path / "a")), stable(load_results(tmp_path / "b")))


def test_failed_cells_are_recorded_and_retried(tmp_path, capsys):
    raw = tiny()
    raw["estimators"][1]["window"] = [6, 8]  # window 6 is not a multiple of chunk_size 4
    raw["inputs"]["norm"] = [0.5, -1.0]  # a negative norm fails when the inputs are built
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(raw))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr()
    assert "tiny: 8 cells: 3 done, 0 skipped (already complete), 5 failed" in err.out
    assert "failed: EVA window=6 norm=0.5: ValueError: window=6 must be a multiple of chunk_size=4" in err.err
    df = load_results(out)
    assert len(df) == 8 and (df["status"] == "failed").sum() == 5
    failed = df[df["status"] == "failed"]
    assert failed["mse"].isna().all()
    assert set(failed["error"]) == {
        "ValueError: window=6 must be a multiple of chunk_size=4 with partition='disjoint': it drops the chunks "
        "inside each window block, so a block must consist of whole chunks (partition='official' keeps every "
        "chunk and accepts any sizes)",
        "ValueError: norm must be >= 0.0, got -1.0",
    }
    assert len(load_results(out, status="ok")) == 3 and len(load_results(out, status="failed")) == 5
    ok_files = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")
                if pd.read_parquet(p)["status"].iloc[0] == "ok"}
    summary = run_sweep(path, out, progress=False)  # a rerun retries only the failed cells
    assert (summary.done, summary.skipped, summary.failed) == (0, 3, 5)
    assert all(p.stat().st_mtime_ns == t for p, t in ok_files.items())


def test_a_retried_cell_that_now_succeeds(tmp_path, monkeypatch):
    real = runner.monte_carlo

    def flaky(est, *args, **kwargs):
        if getattr(est, "num_features", None) == 8:
            raise RuntimeError("injected")
        return real(est, *args, **kwargs)

    monkeypatch.setattr(runner, "monte_carlo", flaky)
    first = run_sweep(tiny(), tmp_path, progress=False)
    assert (first.done, first.failed) == (4, 2)
    assert {e for _, e in first.failures} == {"RuntimeError: injected"}
    monkeypatch.setattr(runner, "monte_carlo", real)
    second = run_sweep(tiny(), tmp_path, progress=False)
    assert (second.done, second.skipped, second.failed) == (2, 4, 0)
    df = load_results(tmp_path)
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    run_sweep(tiny(), tmp_path / "clean", progress=False)
    pd.testing.assert_frame_equal(stable(df), stable(load_results(tmp_path / "clean")))


def test_editing_the_grid_reuses_completed_cells(tmp_path):
    run_sweep(tiny(), tmp_path, progress=False)
    grown = tiny()
    grown["estimators"][0]["num_features"] = [4, 8, 16]
    grown["inputs"]["norm"] = [0.5, 1.0, 1.5]
    summary = run_sweep(grown, tmp_path, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (12 - 6, 6, 0)
    shrunk = tiny()
    shrunk["estimators"].pop()
    assert run_sweep(shrunk, tmp_path, progress=False).skipped == 4
    assert len(load_results(tmp_path)) == 12  # cells that left the grid stay in the store
    assert len(load_results(tmp_path, spec=True)) == 4  # ... unless filtered by the latest spec
    assert len(list((tmp_path / "specs").glob("*.toml"))) == 3
    fresh = run_sweep(shrunk, tmp_path, fresh=True, progress=False)
    assert (fresh.done, fresh.skipped) == (4, 0) and len(load_results(tmp_path)) == 4


def test_load_results_skips_temporaries_and_corrupt_files(tmp_path):
    run_sweep(tiny(), tmp_path, progress=False)
    cells = tmp_path / "cells"
    good = sorted(cells.glob("*.parquet"))
    (cells / ".abc.999999.deadbeef.tmp").write_bytes(good[0].read_bytes()[:100])
    (cells / "truncated.parquet").write_bytes(good[0].read_bytes()[:200])
    with pytest.warns(UserWarning, match=r"skipping unreadable cell file .*truncated\.parquet"):
        df = load_results(tmp_path)
    assert len(df) == 6
    # a truncated cell file counts as not done: the rerun rewrites it
    good[0].write_bytes(good[0].read_bytes()[:300])
    summary = run_sweep(tiny(), tmp_path, progress=False)
    assert (summary.done, summary.skipped) == (1, 5)
    assert not (cells / ".abc.999999.deadbeef.tmp").exists()  # its process is gone: cleaned up


def test_load_results_empty_and_missing(tmp_path):
    with pytest.warns(UserWarning, match="no sweep results in"):
        df = load_results(tmp_path)
    assert isinstance(df, pd.DataFrame) and df.empty
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(ValueError, match="status='done' is not supported"):
        load_results(tmp_path, status="done")


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    raw = tiny()
    raw["replicates"] = 64
    raw["inputs"]["seq_len"] = 64
    raw["inputs"]["norm"] = [0.25, 0.5, 0.75, 1.0]
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(raw))
    out = tmp_path / "killed"
    cells = out / "cells"
    proc = subprocess.Popen([sys.executable, "-m", "evalab", "sweep", str(path), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (cells.is_dir() and any(cells.glob("*.parquet"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no cell file appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored = len(list(cells.glob("*.parquet")))
    assert 1 <= stored < 12, "the run was not interrupted mid-way"
    summary = run_sweep(path, out, progress=False)
    assert (summary.skipped, summary.done, summary.failed) == (stored, 12 - stored, 0)
    run_sweep(path, tmp_path / "whole", progress=False)
    pd.testing.assert_frame_equal(stable(load_results(out)), stable(load_results(tmp_path / "whole")))


def test_dask_cluster_equals_local(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    raw = tiny()
    raw["estimators"][1]["window"] = [6, 8]  # one invalid cell per input: failed rows must match too
    run_sweep(raw, tmp_path / "local", progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_sweep(raw, tmp_path / "dask", executor="dask", scheduler=cluster.scheduler_address, progress=False)
    assert (summary.done, summary.failed) == (6, 2)
    pd.testing.assert_frame_equal(stable(load_results(tmp_path / "local")), stable(load_results(tmp_path / "dask")))


@pytest.mark.slow
def test_dask_worker_processes_equal_local(tmp_path):
    pytest.importorskip("dask.distributed")
    raw = tiny()
    raw["estimators"].pop()
    run_sweep(raw, tmp_path / "local", progress=False)
    summary = run_sweep(raw, tmp_path / "dask", executor="dask", workers=2, progress=False)
    assert (summary.done, summary.failed) == (4, 0)
    pd.testing.assert_frame_equal(stable(load_results(tmp_path / "local")), stable(load_results(tmp_path / "dask")))


def test_missing_dask_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(ImportError, match=r'pip install "evalab\[dask\]"'):
        run_sweep(tiny(), tmp_path, executor="dask", workers=1, progress=False)


def test_run_sweep_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="executor='spark' is not supported"):
        run_sweep(tiny(), tmp_path, executor="spark")
    with pytest.raises(ValueError, match="executor='dask' only"):
        run_sweep(tiny(), tmp_path, workers=2)
    with pytest.raises(ValueError, match="device: 'gpu' is not a supported device"):
        run_sweep(tiny(), tmp_path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' is not available here"):
            run_sweep(tiny(), tmp_path, device="cuda")
    with pytest.raises(TypeError, match="spec must be a Spec, a dict or a path"):
        run_sweep(3, tmp_path)


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    run_sweep(tiny(), tmp_path, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny: 6/6 cells")


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "sweep" in capsys.readouterr().out
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(tiny()))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 7 and out[-1] == f"tiny: 6 cells, 0 invalid, 0 already done in {tmp_path / 'o'}"
    assert out[0].split()[1:] == ["todo", "RFA", "num_features=4", "norm=0.5"]
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "6 done, 0 skipped" in capsys.readouterr().out
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "0 done, 6 skipped" in capsys.readouterr().out
    path.write_text(render_toml({**tiny(), "dtype": "half"}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "dtype: 'half' is not supported" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_any_registered_inputs_kind_passes_its_parameters_through(tmp_path, monkeypatch):
    from evalab.inputs import kinds
    from evalab.inputs import QKV
    from evalab.sweep import SpecError

    def toy(*, length, d=4, tag="a"):  # no seed, dtype or device parameter; a required parameter
        g = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(length, d, generator=g, dtype=torch.float64) for _ in range(3))
        return QKV(q, k, v, 0.5, {"tag": tag})

    monkeypatch.setitem(kinds.INPUTS, "toy", toy)
    raw = {"name": "toy", "replicates": 4, "dtype": "float64", "inputs": {"kind": "toy", "tag": ["x", "y"]},
           "estimators": [{"name": "rfa", "num_features": 4}]}
    with pytest.raises(SpecError, match=r"inputs\.length: missing \(required by inputs kind 'toy'\)"):
        parse_spec(raw)
    raw["inputs"]["length"] = 6
    assert run_sweep(raw, tmp_path, progress=False).done == 2
    df = load_results(tmp_path, spec=parse_spec(raw))
    assert list(df["tag"]) == ["x", "y"] and (df["length"] == 6).all() and (df["inputs"] == "toy").all()
    assert df["input_seed"].isna().all() and (df["scale"] == 0.5).all() and (df["input_scale"] == 0.5).all()  # exact: the scale given, stored
    assert (df["seq_len"] == 6).all() and (df["d"] == 4).all() and (df["status"] == "ok").all()
    assert df["seed"].nunique() == 2  # the Monte-Carlo seed still follows the inputs


def test_the_measurement_table_chooses_what_a_cell_measures(tmp_path, monkeypatch):
    """A kind served by a new entry of the runner's measurement table gets that measurement's row; the Monte-Carlo
    kinds and the model-run kind keep theirs."""
    from evalab.inputs import kinds
    from evalab.sweep import runner

    assert runner.measurement("gaussian").name == "monte_carlo"
    assert runner.measurement("minilm").name == "monte_carlo"
    assert runner.measurement("model").name == "model_gap"
    with pytest.raises(ValueError, match="inputs kind 'nope' has no measurement; expected one of 'gaussian', 'minilm', 'model'"):
        runner.measurement("nope")

    def settings(*, passes=1):
        return {"passes": passes}

    def count_row(cell, options):
        est = runner.build_estimator(cell, **cell.params)
        return {"passes_seen": cell.inputs["passes"], "built": type(est).__name__}

    known = kinds.names()
    monkeypatch.setattr(kinds, "names", lambda: {**known, "counting": settings})  # a kind specs may name
    monkeypatch.setitem(runner.MEASUREMENTS, "counting",
                        runner.Measurement("counting", lambda: {"counting": settings}, count_row))
    raw = {"name": "counting", "replicates": 2, "inputs": {"kind": "counting", "passes": [1, 3]},
           "estimators": [{"name": "rfa", "num_features": 4}]}
    assert run_sweep(raw, tmp_path, progress=False).done == 2
    df = load_results(tmp_path, spec=parse_spec(raw))
    assert list(df["passes_seen"]) == [1, 3] and (df["built"] == "RFA").all() and (df["status"] == "ok").all()
