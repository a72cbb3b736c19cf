"""The lazy package face: ``import evalab`` and ``evalab --help`` stay light; every public name still resolves.

Each check runs a fresh interpreter (this test process has imported everything already).
"""
import json
import subprocess
import sys

import pytest

import evalab as ev


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=120, check=True)


def _imported(*args: str) -> set[str]:
    """The modules that ``python -X importtime <args>`` imported (read from its import-time log)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


HEAVY = ("torch", "transformers", "dask", "matplotlib", "pandas", "evalab.sweep", "evalab.measure", "evalab.estimators")


def test_import_evalab_imports_no_heavy_module():
    out = _python(f"import sys, json, evalab; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_cli_help_and_version_do_not_import_torch(flag):
    imported = _imported("-m", "evalab", flag)
    assert "evalab.cli" in imported  # the log is read right: the command line itself is in it
    assert not imported & {"torch", "numpy", "pandas", "matplotlib", "evalab.sweep"}


def test_subcommand_help_does_not_import_torch():
    assert "torch" not in _imported("-m", "evalab", "reproduce", "--help")


@pytest.mark.parametrize("order", ["module first", "face first"])
def test_old_module_path_does_not_replace_face_function(order):
    """``evalab.model_gap`` is both the function of the face and an old module path (evalab/_moved.py)."""
    steps = ["import evalab.model_gap, evalab.monte_carlo", "f = ev.model_gap; g = ev.monte_carlo"]
    code = "\n".join(["import sys, types, evalab as ev", *(steps if order == "module first" else steps[::-1]),
                      "import evalab.gradient_gap",
                      "assert sys.modules['evalab.model_gap'] is sys.modules['evalab.measure.model_gap']",
                      "print(type(ev.model_gap).__name__, type(ev.monte_carlo).__name__, type(ev.gradient_gap).__name__,",
                      "      ev.model_gap is sys.modules['evalab.measure.model_gap'].model_gap)"])
    assert _python(code).stdout.split() == ["function", "function", "function", "True"]


def test_every_public_name_resolves_to_its_defining_object():
    from evalab.estimators.eva import EVA
    from evalab.measure import theory
    from evalab.measure.monte_carlo import monte_carlo

    assert ev.EVA is EVA and ev.monte_carlo is monte_carlo and ev.theory is theory
    assert ev.inputs.gaussian.__module__ == "evalab.inputs.synthetic"
    for name in ev.__all__:
        assert getattr(ev, name) is not None, name
    assert set(ev.__all__) <= set(dir(ev))


def test_subpackages_resolve_on_access_and_unknown_names_raise():
    code = "import evalab as ev; print(ev.estimators.eva.__name__, ev.sweep.run_sweep.__module__)"
    assert _python(code).stdout.split() == ["evalab.estimators.eva", "evalab.sweep.runner"]
    with pytest.raises(AttributeError, match="module 'evalab' has no attribute 'no_such_name'"):
        ev.no_such_name  # noqa: B018


def test_startup_section_of_the_bench():
    """Section (g) of evalab bench: every command is timed, the overhead is --help minus python -c pass."""
    from evalab.report.bench import STARTUP, bench_startup, markdown

    row = bench_startup(repeats=2)
    assert all(len(row[key].times) == 2 and row[key] > 0 for key in STARTUP)
    assert row["help_overhead_s"] == float(row["help_s"]) - float(row["pass_s"])
    with pytest.raises(ValueError, match="repeats=0"):
        bench_startup(repeats=0)
