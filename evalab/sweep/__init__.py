"""Scripted sweeps: a TOML spec expands into cells, each cell runs the Monte-Carlo engine, one parquet file per
cell lands in an output directory that reruns resume from.

    from evalab.sweep import run_sweep, load_results
    summary = run_sweep("analysis/sweeps/smoke.toml", "results/smoke")
    df = load_results("results/smoke")

Command line: ``evalab sweep SPEC.toml --out DIR``. The spec format is documented in analysis/sweeps/README.md.
"""
from .runner import SweepSummary, run_cell, run_sweep
from .spec import Cell, Spec, SpecError, load_spec, parse_spec
from .store import load_results

__all__ = ["Cell", "Spec", "SpecError", "SweepSummary", "load_results", "load_spec", "parse_spec", "run_cell", "run_sweep"]
