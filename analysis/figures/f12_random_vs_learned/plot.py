"""F12: random vs learned. Relative MSE, squared bias and variance against FLOPs per query of random-feature and
sampling estimators (RFA with hyperbolic orthogonal features, EVA, Scatterbrain), fixed feature maps (elu+1,
taylor, dpfp, the taylor window hybrid at g = 1/2) and maps fitted by attention transfer (evalab.fit: hedgehog
and t2r on the attention cross-entropy; the hedgehog window hybrid, LoLCATs' form, and the taylor window hybrid's
mixing weight on the output error), on inputs the fits never saw; and each fitted map's error on its training
inputs beside its held-out error (the generalisation gap).

Two input families. Gaussian (the spec's sweep): the held-out input seeds of spec.toml; the fits use seeds
0, 1, ...; the fitted files are measured by a sweep that names them (``name = "fitted"``, ``file``, ``sha256``),
whose rows say which split each seed is. MiniLM (compute): all-MiniLM-L6-v2's q/k/v on passages of the shipped
books (evalab.inputs.passages): fits on "train" passages (Genesis), measures on "heldout" ones (Exodus); quick:
the 12 heads of layer 3, full: every layer and head (a per-layer fit). Intervals: 95% Student-t over the
held-out inputs (seeds or passages) of each estimator's per-input metric, which holds the Monte-Carlo noise of
the random estimators and the spread over inputs of all of them.
"""
from __future__ import annotations

import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import evalab as ev
from evalab import figures as fg
from evalab import registry
from evalab.estimators.fitted import fingerprints
from evalab.intervals import mean_interval
from evalab.sweep.spec import short_hash

TITLE = "Random vs learned: rel_mse, bias^2 and variance vs FLOPs per query on held-out inputs; train vs held-out error of fitted maps"
NAME = "F12"
METRICS = ("rel_mse", "rel_bias2", "rel_variance")
COLUMNS = ["inputs", "variant", "split", "fitted", "flops_per_query", "count",
           *[f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")]]
REQUIRED = {"measured": COLUMNS}
LAYER = 3  # quick and tiny: the heads of this layer

#: The fitted maps: label -> (factory of the initial estimator for head size d and window w, loss, learning rate,
#: fraction of the steps). The taylor hybrid fits one mixing weight per head: a larger rate, a third of the steps.
FITS = {
    "hedgehog": (lambda d, w: ev.Hedgehog(d=d, feature_dim=d), "attention", 0.02, 1.0),
    "t2r": (lambda d, w: ev.T2R(d=d, feature_dim=2 * d), "attention", 0.02, 1.0),
    "hedgehog + window": (lambda d, w: ev.Hedgehog(d=d, feature_dim=d, window=w, shift="row_max", affine=False),
                          "output", 0.02, 1.0),
    "taylor + window": (lambda d, w: ev.LinearAttention(feature="taylor", window=w), "output", 0.1, 1 / 3),
}
#: Initial maps measured unfitted, as the fits' starting point.
INITIAL = {"hedgehog (initial)": lambda d, w: ev.Hedgehog(d=d, feature_dim=d)}


def _sizes(ctx):
    return {
        "texts": ctx.pick(tiny=2, quick=2, full=8),  # training inputs (seeds or passages)
        "heldout": ctx.pick(tiny=2, quick=4, full=8),  # held-out MiniLM passages
        "steps": ctx.pick(tiny=2, quick=15, full=100),
        "batch": ctx.pick(tiny=2, quick=2, full=2),
        "seq_len": ctx.pick(tiny=64, quick=128, full=512),
        "layer": ctx.pick(tiny=LAYER, quick=LAYER, full=None),
        "replicates": ctx.pick(tiny=4, quick=8, full=32),
    }


def _window(spec) -> int:
    """The exact window of the spec's hybrids (its EVA block's), used for the fitted hybrids too."""
    return next(int(b["window"]) for b in spec.estimators if b["name"] == "eva")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _fit(ctx, kind, label, train, held, sizes):
    """Fit the map ``label`` of FITS (or reuse the file of an earlier identical fit): (file, sha256, curve rows)."""
    factory, loss, lr, fraction = FITS[label]
    steps = max(1, round(sizes["steps"] * fraction))
    initial = factory(train[0].q.shape[-1], sizes["window"])
    key = {"kind": kind, "label": label, "loss": loss, "train": sorted(set().union(*map(fingerprints, train))),
           "steps": steps, "lr": lr, "batch": sizes["batch"], "window": sizes["window"], "format": 1}
    path = ctx.work / "fitted" / f"{kind}-{_slug(label)}-{short_hash(key, 12)}.safetensors"
    curve_path = path.with_suffix(".parquet")
    if path.is_file() and curve_path.is_file():
        return path, ev.load_fitted(path).sha256, pd.read_parquet(curve_path)
    ctx.log(f"fit {label} on {len(train)} {kind} inputs, {steps} steps")
    res = ev.fit(initial, train, heldout=held, loss=loss, steps=steps, lr=lr, seed=0,
                 batch=min(sizes["batch"], len(train)), progress=False)
    digest = ev.save_fitted(res, path)
    curve = res.curve.assign(inputs=kind, variant=label, loss_kind=loss, lr=lr)
    curve.to_parquet(curve_path, index=False)
    return path, digest, curve


def _gaussian(ctx, frames, sizes):
    """The spec's rows (held-out seeds) plus the fitted maps, fitted on seeds 0.. and measured by a sweep that names
    their files, on the training seeds and the held-out ones."""
    spec = ctx.spec()
    inputs = {k: v for k, v in spec.inputs.items() if k not in ("kind", "seed")}
    held_seeds = spec.inputs["seed"] if isinstance(spec.inputs["seed"], list) else [spec.inputs["seed"]]
    train_seeds = list(range(sizes["texts"]))
    make = lambda s: ev.inputs.gaussian(**inputs, seed=s, dtype=getattr(torch, spec.dtype))
    train, held = [make(s) for s in train_seeds], [make(s) for s in held_seeds]
    d = int(inputs["d"])
    blocks, curves = [], []
    for label in FITS:
        path, digest, curve = _fit(ctx, "gaussian", label, train, held, sizes)
        blocks.append({"name": "fitted", "label": label, "file": str(path), "sha256": digest})
        curves.append(curve)
    raw = spec.to_dict()
    raw["name"] = f"{raw['name']}_fitted"
    raw["inputs"] = {**raw["inputs"], "seed": train_seeds + list(held_seeds)}
    raw["estimators"] = blocks + [{"name": "hedgehog", "label": label, "d": d, "feature_dim": d} for label in INITIAL]
    fitted = ctx.sweep(raw, "fitted")
    fitted["fitted"] = fitted["estimator"] == "fitted"
    fitted.loc[~fitted["fitted"], "split"] = fitted["input_seed"].map(lambda s: "train" if s in train_seeds else "heldout")
    rows = pd.concat([frames["sweep"].assign(split="heldout", fitted=False), fitted], ignore_index=True)
    rows["flops_per_query"] = rows["flops"] / (rows["batch"] * rows["seq_len"])
    rows["inputs"] = "gaussian"
    rows["variant"] = rows["label"]
    return rows, pd.concat(curves, ignore_index=True)


def _minilm_workloads(split, sizes):
    """One workload per passage of ``split``: (12, N, 32) heads of LAYER, or (6, 12, N, 32) for every layer."""
    count = sizes["texts"] if split == "train" else sizes["heldout"]
    full = ev.inputs.minilm(sizes["seq_len"], split=split, count=count)
    out = []
    for i, digest in enumerate(full.info["passage_sha256"]):
        q, k, v = (t[:, i] if sizes["layer"] is None else t[sizes["layer"], i] for t in full)
        info = {"text_sha256": digest, "split": split}
        if sizes["layer"] is None:
            info["layers"] = full.info["layers"]
        out.append(ev.inputs.QKV(q, k, v, full.scale, info))
    return out


def _measure_minilm(estimators: list, sizes: dict, files: dict) -> pd.DataFrame:
    """Per passage and split: rel_mse, rel_bias2, rel_variance and FLOPs per query of each (label, estimator
    name, parameters); fitted ones (``files``: label -> (file, sha256)) on both splits, the others held-out only."""
    work = {split: _minilm_workloads(split, sizes) for split in ("train", "heldout")}
    rows = []
    for label, name, params in estimators:
        est = registry.make_estimator(name, **params)
        splits = ("train", "heldout") if label in files else ("heldout",)
        for split in splits:
            for passage, w in enumerate(work[split]):
                replicates = 2 if est.noise_kind == "none" else sizes["replicates"]  # deterministic: 2 equal copies
                res = ev.monte_carlo(est, *w, replicates=replicates, seed=passage, matrix=False)
                if label in files:
                    assert est.split(w) == split, (label, split)  # the fit saw the train passages only
                batch = math.prod(w.q.shape[:-2])
                rows.append({"inputs": "minilm", "variant": label, "estimator": name, "split": split,
                             "passage": passage, "fitted": label in files,
                             "flops_per_query": res.cost.as_dict()["flops"] / (batch * w.q.shape[-2]),
                             **{m: res.metrics[m].value for m in METRICS}})
    return pd.DataFrame(rows)


def _minilm(ctx, sizes):
    try:
        train = _minilm_workloads("train", sizes)
        held = _minilm_workloads("heldout", sizes)
    except ImportError:
        ctx.log("MiniLM inputs unavailable (optional packages missing): Gaussian panels only")
        return None, None
    spec = ctx.spec()
    d = train[0].q.shape[-1]
    files, curves = {}, []
    for label in FITS:
        path, digest, curve = _fit(ctx, "minilm", label, train, held, sizes)
        files[label] = (str(path), digest)
        curves.append(curve)
    estimators = []
    for cell in spec.cells():
        params = dict(cell.params)
        if "scale" in params:
            params["scale"] = train[0].scale
        estimators.append((cell.label, cell.estimator, params))
    estimators = list({(l, n, repr(p)): (l, n, p) for l, n, p in estimators}.values())
    estimators += [(label, "hedgehog", {"d": d, "feature_dim": d}) for label in INITIAL]
    estimators += [(label, "fitted", {"file": f, "sha256": h}) for label, (f, h) in files.items()]
    rows = ctx.table("minilm", lambda **p: _measure_minilm([tuple(e) for e in p["estimators"]], p["sizes"], p["files"]),
                     estimators=[list(e) for e in estimators], sizes=sizes, files=files)
    return rows, pd.concat(curves, ignore_index=True)


def _aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval over inputs of each metric, per (inputs, variant, split, fitted, FLOPs)."""
    out = []
    for key, group in rows.groupby(["inputs", "variant", "split", "fitted", "flops_per_query"], sort=False):
        row = dict(zip(["inputs", "variant", "split", "fitted", "flops_per_query"], key), count=len(group))
        for m in METRICS:
            values = group[m].to_numpy(float)
            if len(values) > 1:
                est = mean_interval(values)
                row.update({m: est.value, f"{m}_low": est.low, f"{m}_high": est.high})
            else:
                row.update({m: values[0], f"{m}_low": math.nan, f"{m}_high": math.nan})
        out.append(row)
    return pd.DataFrame(out)


def compute(ctx, frames):
    sizes = {**_sizes(ctx), "window": _window(ctx.spec())}
    gaussian, curves = _gaussian(ctx, frames, sizes)
    parts = [gaussian]
    minilm, minilm_curves = _minilm(ctx, sizes)
    if minilm is not None:
        parts.append(minilm)
        curves = pd.concat([curves, minilm_curves], ignore_index=True)
    measured = _aggregate(pd.concat(parts, ignore_index=True))
    # exact softmax's FLOPs per query at each panel's sizes: the cost where "efficient" stops paying
    spec_inputs = ctx.spec().inputs
    sizes_of = {"gaussian": (int(spec_inputs["seq_len"]), int(spec_inputs["d"])), "minilm": (sizes["seq_len"], 32)}
    measured["softmax_flops_per_query"] = [
        ev.estimate_cost(ev.Softmax(), N=sizes_of[kind][0], M=sizes_of[kind][0], d=sizes_of[kind][1],
                         dv=sizes_of[kind][1]).flops() / sizes_of[kind][0] for kind in measured["inputs"]]
    return {"measured": measured, "curves": curves}


# --- drawing ----------------------------------------------------------------------------------------------


def _panels(rows):
    return [p for p in ("gaussian", "minilm") if (rows["inputs"] == p).any()]


PANEL = {"gaussian": "Gaussian", "minilm": "MiniLM"}


def plot(frames):
    rows = fg.require_frame(frames, "measured", COLUMNS, NAME)
    panels = _panels(rows)
    fig, axes = plt.subplots(len(panels), 3, figsize=(18, 4.6 * len(panels) + 0.8), squeeze=False)
    names = []
    for axrow, panel in zip(axes, panels):
        part = rows[rows["inputs"] == panel]
        held = part[part["split"] == "heldout"]
        ax_mse, ax_split, ax_gap = axrow
        for ax in (ax_mse, ax_split):
            ax.set_xscale("log")
            ax.set_yscale("log")
        for name, group in fg.by_variant(held):
            names.append(name)
            fg.errorbar(ax_mse, group, "flops_per_query", "rel_mse", name, label="_nolegend_")
            fg.errorbar(ax_split, group, "flops_per_query", "rel_bias2", name, linestyle="--", label="_nolegend_")
            if group["rel_variance"].gt(0).any():
                fg.errorbar(ax_split, group, "flops_per_query", "rel_variance", name, linestyle=":",
                            markerfacecolor="none", label="_nolegend_")
        fitted = part[part["fitted"]]
        labels = list(dict.fromkeys(fitted["variant"]))
        for i, name in enumerate(labels):
            for j, split in enumerate(("train", "heldout")):
                r = fitted[(fitted["variant"] == name) & (fitted["split"] == split)]
                if not len(r):
                    continue
                r = r.iloc[0]
                err = [[max(r["rel_mse"] - r["rel_mse_low"], 0)], [max(r["rel_mse_high"] - r["rel_mse"], 0)]] \
                    if np.isfinite(r["rel_mse_low"]) else None
                ax_gap.bar(i + (j - 0.5) * 0.38, r["rel_mse"], width=0.36, color=fg.color(name),
                           alpha=0.45 if split == "train" else 1.0, yerr=err, capsize=3)
        ax_gap.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax_gap.set_ylabel("relative MSE (light: train, dark: held-out)")
        ax_gap.set_title(f"{PANEL[panel]}: fitted maps, train vs held-out")
        ax_mse.set_title(f"{PANEL[panel]} (held-out): rel_mse vs cost")
        ax_split.set_title(f"{PANEL[panel]} (held-out): bias^2 (dashed), variance (dotted)")
        for ax in (ax_mse, ax_split):
            ax.set_xlabel("FLOPs per query (cost model)")
            if "softmax_flops_per_query" in part.columns:
                fg.mark_softmax_cost(ax, part["softmax_flops_per_query"].iloc[:1])
            fg.tidy_log(ax)
        ax_mse.set_ylabel("relative MSE")
        ax_split.set_ylabel("relative bias^2, variance")
    fg.legend(fig, names, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


# --- the measured answer ----------------------------------------------------------------------------------


def _eva_at(eva: pd.DataFrame, flops: float) -> tuple[float, float, float, str]:
    """EVA's held-out rel_mse (value, low, high) at ``flops`` per query: log-log interpolation between its two
    nearest points, or its nearest point when ``flops`` lies outside EVA's range (then said so)."""
    eva = eva.sort_values("flops_per_query")
    x = np.log(eva["flops_per_query"].to_numpy(float))
    at = math.log(flops)
    values = [np.exp(np.interp(at, x, np.log(eva[c].clip(lower=1e-300).to_numpy(float)))) for c in
              ("rel_mse", "rel_mse_low", "rel_mse_high")]
    where = "interpolated" if x[0] <= at <= x[-1] else ("EVA's cheapest point" if at < x[0] else "EVA's dearest point")
    return (*values, where)


def answer(rows: pd.DataFrame) -> list[str]:
    """Per input family and fitted map: held-out rel_mse against EVA's at the same FLOPs, and held-out / train."""
    lines = []
    for panel in _panels(rows):
        part = rows[rows["inputs"] == panel]
        eva = part[(part["variant"] == "EVA") & (part["split"] == "heldout")]
        items = []
        for name in dict.fromkeys(part.loc[part["fitted"], "variant"]):
            f = part[(part["variant"] == name) & part["fitted"]].set_index("split")
            if "heldout" not in f.index:
                continue
            h = f.loc["heldout"]
            text = f"{name} {h['rel_mse']:.3g} [{h['rel_mse_low']:.3g}, {h['rel_mse_high']:.3g}] at {h['flops_per_query']:.3g} FLOPs/query"
            if len(eva):
                value, low, high, where = _eva_at(eva, h["flops_per_query"])
                verdict = ("beats EVA" if h["rel_mse_high"] < low else "loses to EVA" if h["rel_mse_low"] > high
                           else "ties with EVA (intervals overlap)")
                text += f", EVA {value:.3g} [{low:.3g}, {high:.3g}] ({where}): {verdict}, ratio {h['rel_mse'] / value:.2g}"
            if "train" in f.index:
                text += f"; held-out / train rel_mse {h['rel_mse'] / f.loc['train', 'rel_mse']:.2f}"
            items.append(text)
        softmax = part["softmax_flops_per_query"].iloc[0] if "softmax_flops_per_query" in part.columns else math.nan
        lines.append(f"{PANEL[panel]} (exact softmax: {softmax:.3g} FLOPs/query): " + "; ".join(items))
    return lines


def caption(frames):
    rows = frames["measured"]
    curves = frames.get("curves")
    fits = ""
    if curves is not None and len(curves):
        steps = int(curves["step"].max())
        fits = (f" Fits: evalab.fit, Adam, lr 0.02, seed 0, {steps} steps, minibatches of 2 training inputs; hedgehog "
                "(feature_dim = d, 2d features, identity init) and t2r (2d features, uniform init) on the attention "
                "cross-entropy; the hedgehog window hybrid (LoLCATs' conventions: row-max shift, feature terms "
                "weighted 1; a sliding window of EVA's width; mixing weight learned) and the taylor window hybrid's "
                "mixing weight alone (evalab's conventions: no shift, weights g and 1 - g; lr 0.1, a third of the "
                "steps) on the output error.")
    text = [
        "Left: relative MSE (95% t-intervals over the held-out inputs) against the cost model's FLOPs per query; "
        "middle: its split into squared bias (dashed) and variance (dotted; 0 for every deterministic map, so only "
        "the random estimators have dotted lines); right: each fitted map's rel_mse on the inputs it was fitted on "
        "(light) and on held-out inputs (dark). Gaussian: the spec's held-out seeds, fits on seeds 0, 1, ...; "
        "MiniLM: all-MiniLM-L6-v2's q/k/v on passages of the shipped books, fits on Genesis passages (train), "
        "measured on Exodus passages (held-out)." + fits,
        "Does a fitted map beat EVA at matched FLOPs on held-out heads, and by how much does its error grow from "
        "train to held-out? EVA's rel_mse is read at the fitted map's FLOPs by log-log interpolation along its chunk "
        "sizes; where the fitted map costs more than EVA's dearest point, EVA is taken at that point (fewer FLOPs: "
        "in the fitted map's favour). \"Beats\" and \"loses\" need disjoint intervals. Exact softmax's own FLOPs per "
        "query are given per panel and drawn as the dash-dot line: at short sequences the feature maps cost about as "
        "much. Findings: " + " | ".join(answer(rows)) + ".",
    ]
    return "\n\n".join(text)
