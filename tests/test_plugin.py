"""Estimators defined outside evalab: the example plugin package (examples/plugin) installed with pip, named in
specs by entry point, import path or register_estimator, swept locally and on Dask worker processes; spec
errors; plugin rows in the cost-frontier figure; the worked example of docs/estimators.md."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

import evalab as ev
from evalab import figures as fg
from evalab import registry
from evalab.inputs.kinds import make_inputs
from evalab.report.reproduce import discover, load_module
from evalab.cli import main
from evalab.sweep import SpecError, load_results, parse_spec, run_sweep
from evalab.sweep.spec import render_toml
from evalab.testing import check_estimator

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("wall_seconds", "finished_at", "host", "spec_hash", "spec_name")


def install(source: Path, target: Path) -> None:
    """Install the package at ``source`` into ``target`` offline: with pip where the environment can build it
    without network (setuptools present), else by hand as pip lays it out (the package and a .dist-info with
    its entry points)."""
    if importlib.util.find_spec("setuptools") is not None:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--no-build-isolation", "--target", str(target), str(source)], capture_output=True)
        if pip.returncode == 0:
            return
        shutil.rmtree(target, ignore_errors=True)
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    shutil.copytree(source / "src", target)
    info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) for group, points in groups.items()))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """examples/plugin installed (offline, no dependencies) into a temporary folder on sys.path and on
    PYTHONPATH (for worker processes); yields the package's TopK class."""
    tmp = tmp_path_factory.mktemp("plugin")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(ROOT / "examples" / "plugin", source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    install(source, target)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p))
        importlib.invalidate_caches()
        yield importlib.import_module("evalab_topk").TopK
    sys.modules.pop("evalab_topk", None)


def spec(*blocks, seq_len=16) -> dict:
    return {"name": "plugin", "replicates": 4, "seed": 0, "dtype": "float64",
            "inputs": {"kind": "gaussian", "seq_len": seq_len, "d": 8, "norm": 1.5}, "estimators": list(blocks)}


def top_k_reference(q, k, v, top_k):
    """Hand-written float64 top-k attention: logits outside each row's top_k largest set to -inf, then softmax."""
    logits = (q.double() @ k.double().T) * q.shape[-1] ** -0.5
    threshold = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
    return torch.softmax(logits.masked_fill(logits < threshold, -math.inf), dim=-1) @ v.double()


def stable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in VOLATILE if c in df]).set_index("cell_id").sort_index()


def test_installed_plugin_is_found_by_entry_point_and_passes_check_estimator(plugin):
    assert registry.estimator_class("topk") is plugin
    assert registry.estimator_class("evalab_topk:TopK") is plugin
    check_estimator(plugin(top_k=4))
    q, k, v = ev.inputs.gaussian(seq_len=12, d=8, norm=2.0, seed=3)
    est = plugin(top_k=5)
    got = est(q, k, v, est.draw(q, k, replicates=2))
    assert (got - top_k_reference(q, k, v, 5)).abs().max() < 1e-12


def test_plugin_sweep_by_entry_point_and_path(plugin, tmp_path):
    raw = spec({"name": "topk", "top_k": [3, 16]}, {"name": "evalab_topk:TopK", "label": "top-8", "top_k": 8},
               {"name": "rfa", "num_features": 4})
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(raw))
    assert main(["sweep", str(path), "--out", str(tmp_path), "--quiet"]) == 0  # evalab sweep, in this process
    df = load_results(tmp_path, spec=True)
    assert (df["status"] == "ok").all()
    assert list(df["estimator"]) == ["topk", "topk", "evalab_topk:TopK", "rfa"]
    assert list(df["label"]) == ["topk", "topk", "top-8", "rfa"]  # the label defaults to the entry point's name
    assert list(df["top_k"].iloc[:3]) == [3, 16, 8] and math.isnan(df["top_k"].iloc[3])
    q, k, v = make_inputs("gaussian", seq_len=16, d=8, norm=1.5, seed=int(df["input_seed"].iloc[0]))
    exact = ev.softmax_attention(q, k, v)
    for top_k, row in zip((3, 16, 8), df.itertuples()):
        approx = top_k_reference(q, k, v, top_k)
        rel_mse = float(((approx - exact) ** 2).sum(-1).mean() / (exact**2).sum(-1).mean())
        assert row.rel_mse == pytest.approx(rel_mse, rel=1e-9, abs=1e-20)
        flops = 2 * 16 * 16 * 8 + 16 * 16 + 4 * 16 * top_k + 2 * 16 * top_k * 8  # the plugin's own cost model
        assert row.flops == flops and row.variance == pytest.approx(0.0, abs=1e-20)


@pytest.mark.slow
def test_plugin_on_dask_worker_processes_equals_local(plugin, tmp_path, monkeypatch, capsys):
    """Workers are fresh processes: they know the built-ins only and build the others from the import path the
    cells carry. A class registered in this process from a module the workers cannot import fails there with
    an error naming the path."""
    pytest.importorskip("dask.distributed")
    monkeypatch.setitem(registry.ESTIMATORS, "my_topk", plugin)
    module = types.ModuleType("evalab_session_only")
    local = dataclasses.make_dataclass("LocalTopK", [("top_k", int, 4)], bases=(plugin,), frozen=True,
                                       namespace={"__module__": "evalab_session_only"})
    module.LocalTopK = local
    monkeypatch.setitem(sys.modules, "evalab_session_only", module)
    monkeypatch.setitem(registry.ESTIMATORS, "session_topk", local)
    raw = spec({"name": "topk", "top_k": 3}, {"name": "my_topk", "top_k": 5}, {"name": "softmax"})
    assert [c.target for c in parse_spec(raw).cells()] == ["evalab_topk:TopK"] * 2 + [None]
    run_sweep(raw, tmp_path / "local", progress=False)
    raw["estimators"].append({"name": "session_topk"})
    path = tmp_path / "spec.toml"
    path.write_text(render_toml(raw))
    assert main(["sweep", str(path), "--out", str(tmp_path / "dask"), "--executor", "dask", "--workers", "1", "--quiet"]) == 1
    assert "3 done, 0 skipped (already complete), 1 failed" in capsys.readouterr().out
    rows = load_results(tmp_path / "dask", spec=parse_spec(raw))
    assert rows["error"].iloc[3].startswith(
        "ValueError: estimator 'evalab_session_only:LocalTopK' cannot be imported: ModuleNotFoundError")
    pd.testing.assert_frame_equal(stable(load_results(tmp_path / "local")), stable(rows.iloc[:3]), check_dtype=False)
    assert rows["flops"].iloc[:3].notna().all() and list(rows["label"].iloc[:3]) == ["topk", "TopK", "softmax"]


@pytest.mark.slow
def test_external_dask_scheduler_checks_that_workers_import_every_estimator(plugin, tmp_path, monkeypatch):
    """With a scheduler address (a cluster evalab did not start), the workers are asked to import every estimator
    named by import path before any cell is sent: one they cannot import stops the sweep with an error naming
    the estimator and the worker, and nothing is stored; the installed plugin passes and its cells run there."""
    distributed = pytest.importorskip("dask.distributed")
    module = types.ModuleType("evalab_session_only")
    local = dataclasses.make_dataclass("LocalTopK", [("top_k", int, 4)], bases=(plugin,), frozen=True,
                                       namespace={"__module__": "evalab_session_only"})
    module.LocalTopK = local
    monkeypatch.setitem(sys.modules, "evalab_session_only", module)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        worker = next(iter(cluster.scheduler_info["workers"]))
        raw = spec({"name": "topk", "top_k": 3}, {"name": "evalab_session_only:LocalTopK"})
        with pytest.raises(ImportError, match=re.escape(
                f"Dask worker {worker} of {address} cannot import estimator 'evalab_session_only:LocalTopK' "
                "(evalab_session_only:LocalTopK): estimator 'evalab_session_only:LocalTopK' cannot be imported: "
                "ModuleNotFoundError")):
            run_sweep(raw, tmp_path / "refused", executor="dask", scheduler=address, progress=False)
        assert not list((tmp_path / "refused").glob("*.parquet")) and not list((tmp_path / "refused").glob("**/*.parquet"))
        raw["estimators"].pop()
        summary = run_sweep(raw, tmp_path / "ok", executor="dask", scheduler=address, progress=False)
    assert summary.ok and summary.done == 1
    assert list(load_results(tmp_path / "ok")["label"]) == ["topk"]


def test_register_estimator_in_process(tmp_path, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Halved(ev.RFA):  # RFA under another name, defined where no other process can import it
        pass

    monkeypatch.setattr(registry, "ESTIMATORS", dict(registry.ESTIMATORS))
    assert ev.register_estimator("halved", Halved) is Halved
    assert ev.register_estimator("halved", Halved) is Halved  # again: no-op
    with pytest.raises(ValueError, match="'rfa' is already registered as evalab.estimators.rfa:RFA"):
        ev.register_estimator("rfa", Halved)
    with pytest.raises(ValueError, match="without ':'"):
        ev.register_estimator("a:b", Halved)
    with pytest.raises(TypeError, match="cls must be a class"):
        ev.register_estimator("x", Halved())
    raw = spec({"name": "halved", "num_features": 4}, {"name": "rfa", "num_features": 4})
    cells = parse_spec(raw).cells()
    assert cells[0].label == "Halved" and cells[0].target.endswith(":test_register_estimator_in_process.<locals>.Halved")
    assert cells[0].mc_seed == cells[1].mc_seed
    run_sweep(raw, tmp_path, progress=False)
    df = load_results(tmp_path, spec=parse_spec(raw))
    assert list(df["estimator"]) == ["halved", "rfa"]
    # a subclass with RFA's fields and noise: the same numbers as RFA on the same draws
    for column in ("rel_mse", "flops", "num_features", "sampler"):
        assert df[column].iloc[0] == df[column].iloc[1], column


def test_a_class_that_is_not_a_dataclass(plugin, tmp_path, monkeypatch):
    """Its constructor's keyword parameters are the spec's parameters and the row's columns."""

    class Plain:
        noise_kind = "none"

        def __init__(self, top_k=4, scale=None):
            self.top_k, self.scale, self.inner = top_k, scale, plugin(top_k=top_k, scale=scale)

        def noise_layout(self, q, k):
            return self.inner.noise_layout(q, k)

        def draw(self, q, k, *, replicates=1, generator=None):
            return self.inner.draw(q, k, replicates=replicates, generator=generator)

        def __call__(self, q, k, v, draw):
            return self.inner(q, k, v, draw)

    monkeypatch.setattr(registry, "ESTIMATORS", dict(registry.ESTIMATORS))
    ev.register_estimator("plain", Plain)
    with pytest.raises(SpecError, match="its parameters: top_k, scale"):
        parse_spec(spec({"name": "plain", "k": 2}))
    raw = spec({"name": "plain", "top_k": [2, 5]}, {"name": "topk", "top_k": [2, 5]})
    run_sweep(raw, tmp_path, progress=False)
    df = load_results(tmp_path, spec=parse_spec(raw))
    assert list(df["label"]) == ["Plain", "Plain", "topk", "topk"] and list(df["top_k"]) == [2, 5, 2, 5]
    assert list(df["rel_mse"].iloc[:2]) == list(df["rel_mse"].iloc[2:])
    assert df["flops"].iloc[:2].isna().all() and df["flops"].iloc[2:].notna().all()  # no cost method: NaN


def test_spec_errors_name_the_path_and_list_the_class_parameters(plugin):
    with pytest.raises(SpecError, match=re.escape(
            "estimators[0].top: unknown parameter of estimator 'evalab_topk:TopK'; its parameters: top_k, scale")):
        parse_spec(spec({"name": "evalab_topk:TopK", "top": 3}))
    with pytest.raises(SpecError, match=re.escape(
            "estimators[0].name: estimator 'no_such_module:TopK' cannot be imported: ModuleNotFoundError")):
        parse_spec(spec({"name": "no_such_module:TopK"}))
    with pytest.raises(SpecError, match=re.escape("module 'evalab_topk' has no 'Top'")):
        parse_spec(spec({"name": "evalab_topk:Top"}))
    with pytest.raises(SpecError, match=re.escape("'evalab_topk:ev' is not a class")):
        parse_spec(spec({"name": "evalab_topk:ev"}))
    with pytest.raises(SpecError, match=r"'topkk' is not a registered estimator; expected one of 'softmax', .*'topk', or an import path"):
        parse_spec(spec({"name": "topkk"}))
    with pytest.raises(SpecError, match=re.escape("estimators[0].num_keys: missing (required by estimator 'evalab_test_required:Needs')")):
        module = types.ModuleType("evalab_test_required")
        module.Needs = dataclasses.make_dataclass("Needs", [("num_keys", int)], namespace={"__module__": module.__name__})
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, module.__name__, module)
            parse_spec(spec({"name": "evalab_test_required:Needs"}))
    # an invalid value is a failed cell, as for built-ins, with the plugin's own message
    cells = parse_spec(spec({"name": "topk", "top_k": [0, 2]})).cells()
    assert [c.error for c in cells] == ["ValueError: top_k must be an int >= 1, got 0", None]


def test_cost_frontier_draws_plugins_with_a_cost_model():
    """F6: a plugin with a cost model gets its own points and frontier in its stable colour and marker; one
    without (NaN flops) is left out of the figure and named in the caption."""
    rows = []
    for s in (8, 16, 32):
        rows.append({"estimator": "rfa", "feature_map": "positive", "sampler": "iid", "num_features": s,
                     "flops": 1000.0 * s, "rel_mse": 1.0 / s})
    for top_k in (2, 4, 8):
        rows.append({"estimator": "topk", "label": "TopK", "top_k": top_k, "flops": 3000.0 * top_k, "rel_mse": 0.2 / top_k})
    rows.append({"estimator": "mine:NoCost", "label": "NoCost", "flops": np.nan, "rel_mse": 0.5})
    frame = pd.DataFrame(rows).assign(norm=1.0, seq_len=64, d=16, replicates=8)
    frame["rel_mse_low"], frame["rel_mse_high"] = frame["rel_mse"] * 0.8, frame["rel_mse"] * 1.2
    module = load_module(next(f for f in discover() if f.name.startswith("f06")))
    with fg.style():
        fig = module.plot({"sweep": frame})
    ax = fig.axes[0]
    topk = [line for line in ax.lines if to_hex(line.get_color()) == to_hex(fg.color("TopK"))
            and line.get_marker() == fg.marker("TopK")]
    assert any(list(line.get_xdata()) == [6000.0, 12000.0, 24000.0] for line in topk)  # exact: the FLOPs of the frame's rows, drawn unchanged; its Pareto frontier
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "TopK" in texts and "NoCost" not in texts
    plt.close(fig)
    caption = module.caption({"sweep": frame})
    assert "NoCost" in caption and "no cost model" in caption


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_docs_estimators_example_runs(tmp_path, monkeypatch):
    """Every python block of docs/estimators.md, in order, in one namespace, in an empty working directory."""
    blocks = _python_blocks(ROOT / "docs" / "estimators.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {"__name__": "docs_estimators"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/estimators.md[python block {i}]", "exec"), namespace)
    finally:
        plt.close("all")
        sys.modules.pop("random_keys", None)
