"""The command line reports errors in one line with the documented exit status: 2 usage, 1 failure,
130 interrupted (rerun to resume); --debug shows the traceback. One sweep per output directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evalab.cli import main
from evalab.sweep import store
from evalab.sweep.spec import render_toml
from evalab.sweep import runner

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SPEC = {"name": "tiny", "replicates": 4, "seed": 0, "inputs": {"kind": "gaussian", "seq_len": 8, "d": 4},
        "estimators": [{"name": "rfa", "num_features": [2, 4]}]}


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(SPEC))
    return str(path)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_out_is_a_file(spec, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["sweep", spec, "--out", str(a_file)]) == 2
    assert one_line(capsys.readouterr().err) == (f"evalab sweep: error: --out {str(a_file)!r} is a file; expected a "
                                                 "directory (existing or to be created)")
    assert main(["reproduce", "--quick", "--out", str(a_file)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"evalab reproduce: error: --out {str(a_file)!r} is a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_missing_cuda(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device 'cuda' is not available here" in one_line(capsys.readouterr().err)


def test_unwritable_output_directory(spec, tmp_path, capsys, monkeypatch):
    """As root a read-only folder stays writable, so the failed write is simulated where the store writes."""
    out = tmp_path / "out"

    def refuse(out_, text, spec_hash):
        raise PermissionError(13, "Permission denied", str(Path(out_) / f".spec.{os.getpid()}.0a1b2c3d.tmp"))

    monkeypatch.setattr(store, "write_spec", refuse)
    assert main(["sweep", spec, "--out", str(out), "--quiet"]) == 1
    assert one_line(capsys.readouterr().err) == (f"evalab sweep: error: Permission denied: {str(out)!r} "
                                                 "(rerun with --debug for the traceback)")


def test_unreachable_scheduler(spec, tmp_path, capsys):
    pytest.importorskip("distributed")
    start = time.monotonic()
    assert main(["sweep", spec, "--out", str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9", "--quiet"]) == 1
    assert time.monotonic() - start < runner.SCHEDULER_TIMEOUT + 30  # fails fast (no timing assertion intended)
    assert one_line(capsys.readouterr().err).startswith("evalab sweep: error: cannot reach the Dask scheduler at "
                                                        "tcp://127.0.0.1:9")


def test_usage_errors_exit_2(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", spec])  # --out missing
    assert exit_.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert one_line(capsys.readouterr().err).startswith("evalab sweep: error:")


def test_unexpected_errors_one_line_or_traceback_with_debug(spec, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(runner, "run_sweep", boom)
    monkeypatch.setattr("evalab.sweep.run_sweep", boom)
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 1
    assert one_line(capsys.readouterr().err) == ("evalab sweep: error: RuntimeError: something broke over two lines "
                                                 "(rerun with --debug for the traceback)")
    for argv in (["--debug", "sweep", spec, "--out", str(tmp_path / "o")], ["sweep", spec, "--out", str(tmp_path / "o"), "--debug"]):
        with pytest.raises(RuntimeError, match="something broke"):
            main(argv)


def test_interrupt_exits_130(spec, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("evalab.sweep.run_sweep", interrupted)
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 130
    assert one_line(capsys.readouterr().err) == "evalab sweep: interrupted; rerun the same command to resume"


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("executor", [[], pytest.param(["--workers", "2"], marks=pytest.mark.slow)],
                         ids=["local", "dask"])
def test_ctrl_c_in_a_sweep(tmp_path, executor):
    """SIGINT to the process group (as a terminal's Ctrl-C, which reaches Dask's worker processes too) mid-sweep:
    exit 130 and one line, no traceback from this process or the workers; the lock is released."""
    if executor:
        pytest.importorskip("distributed")
    slow = {**SPEC, "replicates": 64, "inputs": {"kind": "gaussian", "seq_len": 64, "d": 8, "norm": [0.5, 1.0, 1.5]},
            "estimators": [{"name": "rfa", "num_features": [4, 8, 16, 32, 64, 128]}]}
    path, out = tmp_path / "slow.toml", tmp_path / "out"
    path.write_text(render_toml(slow))
    proc = _start(["-m", "evalab", "sweep", str(path), "--out", str(out), "--quiet", *executor], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (store.cells_dir(out).is_dir() and any(store.cells_dir(out).glob("*.parquet"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the interrupt arrived")
    assert proc.returncode == 130
    assert one_line(stderr) == "evalab sweep: interrupted; rerun the same command to resume"
    assert not (out / store.OWNER).exists()  # the lock is released


def test_second_sweep_into_a_directory_in_use_and_a_stale_lock(spec, tmp_path, capsys):
    """A live holder: the second sweep exits at once naming it. A killed holder (SIGKILL leaves its owner file):
    the kernel released its lock, the next sweep takes over and says so."""
    out = tmp_path / "out"
    out.mkdir()
    holder = _start(["-c", "import sys, time; from evalab.sweep import store\n"
                           f"with store.lock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"])
    assert holder.stdout.readline().strip() == "held"
    try:
        assert main(["sweep", spec, "--out", str(out), "--quiet"]) == 1
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"evalab sweep: error: {str(out)!r} is in use by another evalab sweep (pid {holder.pid} on ")
        assert not store.cells_dir(out).exists()  # it wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"pid {holder.pid}" in (out / store.OWNER).read_text()
    assert main(["sweep", spec, "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"took over {out}: its previous sweep (pid {holder.pid} on " in err and "Traceback" not in err
    assert len(list(store.cells_dir(out).glob("*.parquet"))) == 2 and not (out / store.OWNER).exists()


def test_check_command(tmp_path, capsys, monkeypatch):
    """evalab check NAME|module:Class: every property on the class's check instances (or the --param instance);
    exit 1 naming each failing property, 2 for a name that resolves to nothing."""
    import dataclasses
    import types

    import evalab as ev

    assert main(["check", "softmax"]) == 0
    out = capsys.readouterr().out
    assert "ok      Softmax(causal=False, scale=None): 14 of 14 properties" in out
    assert out.strip().endswith("softmax: 2 of 2 instances pass check_estimator")
    assert main(["check", "rfa", "--param", "num_features=4", "--param", "sampler=\"orthogonal\"", "--seq-len", "8"]) == 0
    assert "RFA(num_features=4, feature_map='positive', sampler='orthogonal'" in capsys.readouterr().out

    @dataclasses.dataclass(frozen=True)
    class Squeezed(ev.Softmax):  # drops the replicate axis when R = 1
        def __call__(self, q, k, v, draw):
            return super().__call__(q, k, v, draw).squeeze(0)

    module = types.ModuleType("evalab_check_example")
    Squeezed.__module__, Squeezed.__qualname__ = module.__name__, "Squeezed"
    module.Squeezed = Squeezed
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert main(["check", "evalab_check_example:Squeezed"]) == 1
    out = capsys.readouterr().out
    assert "FAILED  Squeezed(causal=False, scale=None): 13 of 14 properties" in out
    assert "check_estimator [replicates] Squeezed(causal=False, scale=None): draw(replicates=1) gave an output of shape" in out
    assert out.strip().endswith("evalab_check_example:Squeezed: 0 of 2 instances pass check_estimator")
    assert main(["check", "no_such_module:X"]) == 2
    assert "evalab check: error: estimator 'no_such_module:X' cannot be imported: ModuleNotFoundError" in capsys.readouterr().err
    assert main(["check", "rfa", "--param", "num_features=0"]) == 2
    assert "evalab check: error: num_features must be >= 1, got 0" in capsys.readouterr().err
