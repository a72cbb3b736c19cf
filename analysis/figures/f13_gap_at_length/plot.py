"""F13: the end-to-end gap at length. all-MiniLM-L6-v2 run end to end with each estimator in place of its softmax
attention (ev.model_gap, inputs kind "model") on held-out passages (Exodus, ev.inputs.passages) of 128, 256 and
512 tokens: (a-c) embedding cosine and (d-f) last-hidden-state error against the fraction of softmax's own
attention FLOPs, one column per length; (g) does the per-call gap still rank the model gap (Spearman across
cells, per length); (h) per-call rel_mse against the end-to-end error at the longest length.

The sweep (spec.toml / spec_quick.toml) runs the fixed-setting methods. compute() adds the fitted window hybrids
(FITS): LoLCATs' hedgehog + sliding window and Based's taylor + window, each fitted once by ev.fit on the output
error to the model's q, k, v on train passages (Genesis) of the sweep's shortest length, one set of parameters per
layer and head (a FittedLayers bundle, stored under ``<work>/fitted``), then run by ev.model_gap with that bundle on
the sweep's held-out passages, replicates, seeds and call_replicates at every length; their rows join the sweep
frame (same columns, ``label`` the variant). The table "fits" holds each fit's settings and training loss.
"""
from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pandas as pd

import evalab as ev
from evalab.report import figures as fg
from evalab.inputs.minilm import EXTRA_HINT, available
from evalab.report.reproduce import FigureSkipped
from evalab.estimators.fitted import fingerprints
from evalab.sweep.spec import short_hash

if not available():  # the sweep runs before compute(): without the model, skip as soon as loaded
    raise FigureSkipped(f"F13 needs the optional packages of evalab.inputs.minilm ({EXTRA_HINT})")

TITLE = "The end-to-end gap at length: MiniLM on held-out passages of 128-512 tokens, per fraction of softmax's FLOPs"
NAME = "F13"
SWEEP = ["estimator", "seq_len", "split", "flops", "softmax_flops", "flops_fraction", "embedding_cosine",
         "embedding_cosine_low", "embedding_cosine_high", "last_hidden_rel_error", "last_hidden_rel_error_low",
         "last_hidden_rel_error_high", "neighbour_agreement", "call_rel_mse", "texts", "tokens", "replicates"]
REQUIRED = {"sweep": SWEEP}


FITS_COLUMNS = ["variant", "loss", "lr", "steps", "batch", "texts", "seq_len", "window", "initial_loss", "final_loss"]

#: The fitted hybrids: label -> (factory of the initial estimator for head size d and window w, learning rate,
#: fraction of the steps); both on the output error. Hedgehog + window in LoLCATs' conventions (feature_dim = d,
#: row-max shift, feature terms weighted 1, mixing weight learned); taylor + window fits its mixing weight alone
#: (a larger rate, a third of the steps), as in F12.
FITS = {
    "hedgehog + window (fitted)": (lambda d, w: ev.Hedgehog(d=d, feature_dim=d, window=w, shift="row_max",
                                                            affine=False), 0.02, 1.0),
    "taylor + window (fitted)": (lambda d, w: ev.LinearAttention(feature="taylor", window=w), 0.1, 1 / 3),
}
FIT_LOSS = "output"


def _fit_sizes(ctx, spec) -> dict:
    """Train passages, Adam steps and minibatch of the fits (at the sweep's shortest length); the window is EVA's."""
    lengths = spec.inputs["seq_len"]
    return {"texts": ctx.pick(tiny=2, quick=2, full=8), "steps": ctx.pick(tiny=2, quick=9, full=120),
            "batch": 2, "seq_len": min(lengths) if isinstance(lengths, list) else int(lengths),
            "window": next(int(b["window"]) for b in spec.estimators if b["name"] == "eva")}


def _fit(ctx, label: str, train, sizes: dict) -> tuple[str, str, dict]:
    """Fit FITS[label] on ``train`` per layer and head (or reuse the file of an identical earlier fit under
    ``<work>/fitted``): (file, sha256, the "fits" row)."""
    factory, lr, fraction = FITS[label]
    steps = max(1, round(sizes["steps"] * fraction))
    key = {"label": label, "loss": FIT_LOSS, "lr": lr, "steps": steps, **sizes, "train": sorted(fingerprints(train)),
           "format": 1}
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    path = ctx.work / "fitted" / f"{slug}-{short_hash(key, 12)}.safetensors"
    row_path = path.with_suffix(".json")
    if path.is_file() and row_path.is_file():
        return str(path), ev.load_fitted(path).sha256, json.loads(row_path.read_text())
    ctx.log(f"fit {label} on {sizes['texts']} train passages of {sizes['seq_len']} tokens, {steps} steps")
    res = ev.fit(factory(train.q.shape[-1], sizes["window"]), train, loss=FIT_LOSS, steps=steps, lr=lr, seed=0,
                 batch=min(sizes["batch"], sizes["texts"]), progress=False)
    digest = ev.save_fitted(res, path)
    curve = res.curve[res.curve["split"] == "train"]
    row = {"variant": label, "loss": FIT_LOSS, "lr": lr, "steps": steps, "batch": res.training["batch"],
           "texts": sizes["texts"], "seq_len": sizes["seq_len"], "window": sizes["window"],
           "initial_loss": float(curve["loss"].iloc[0]), "final_loss": res.loss("train")}
    row_path.write_text(json.dumps(row))
    return str(path), digest, row


def _frame(frames) -> pd.DataFrame:
    return fg.with_variant(fg.require_frame(frames, "sweep", SWEEP, NAME))


def _measure_fitted(files: dict, settings: dict) -> pd.DataFrame:
    """One model_gap row per fitted bundle (``files``: label -> (file, sha256)) and sweep length (``settings``:
    texts, split, layers, call_replicates, replicates and the sweep's Monte-Carlo seed per seq_len), as the sweep's
    rows are made (one intra-op thread, evalab.measure.model_gap.sweep_row)."""
    rows = []
    for label, (file, digest) in files.items():
        bundle = ev.load_fitted(file, sha256=digest).estimator
        for n, seed in settings["seeds"]:
            res = ev.model_gap(bundle, "minilm", settings["texts"], seq_len=n, split=settings["split"],
                               layers=settings["layers"], replicates=settings["replicates"], seed=seed,
                               call_replicates=settings["call_replicates"], threads=1)
            rows.append({**res.to_frame().iloc[0].to_dict(), "label": label, "kind": "model"})
    return pd.DataFrame(rows)


def compute(ctx, frames):
    """The fitted hybrids (module docstring): their model_gap rows appended to the sweep's, and the table "fits"."""
    spec = ctx.spec()
    sizes = _fit_sizes(ctx, spec)
    train = ev.inputs.minilm(sizes["seq_len"], split="train", count=sizes["texts"])
    files, fits = {}, []
    for label in FITS:
        path, digest, row = _fit(ctx, label, train, sizes)
        files[label] = (path, digest)
        fits.append(row)
    seeds = sorted({(int(c.inputs["seq_len"]), int(c.mc_seed)) for c in spec.cells()})
    settings = {key: spec.inputs[key] for key in ("texts", "split", "layers", "call_replicates")}
    settings.update(replicates=spec.replicates, seeds=[list(s) for s in seeds])
    fitted = ctx.table("fitted", lambda **p: _measure_fitted(p["files"], p["settings"]),
                       files={k: list(v) for k, v in files.items()}, settings=settings)
    sweep = frames["sweep"]
    fitted = fitted[[c for c in sweep.columns if c in fitted.columns]]
    return {"sweep": pd.concat([sweep, fitted], ignore_index=True), "fits": pd.DataFrame(fits, columns=FITS_COLUMNS)}


def _spearman(frame: pd.DataFrame) -> pd.DataFrame:
    """Per seq_len: Spearman across cells of call_rel_mse with last_hidden_rel_error and embedding_cosine."""
    rows = []
    for n, part in frame.groupby("seq_len"):
        corr = ev.gap_correlation(part, end_to_end=("last_hidden_rel_error", "embedding_cosine"))
        for _, r in corr.iterrows():
            rows.append({"seq_len": int(n), "end_to_end": r["end_to_end"], "spearman": r["spearman"],
                         "cells": int(r["cells"])})
    return pd.DataFrame(rows)


def plot(frames):
    frame = _frame(frames)
    lengths = sorted(int(n) for n in frame["seq_len"].unique())
    names = fg.ordered(frame["variant"])
    fig = plt.figure(figsize=(4.0 * (len(lengths) + 1), 8.4))
    grid = fig.add_gridspec(2, len(lengths) + 1)
    letters = iter("abcdefghijklmnop")
    cos_axes = [fig.add_subplot(grid[0, i]) for i in range(len(lengths))]
    err_axes = [fig.add_subplot(grid[1, i], sharex=cos_axes[i]) for i in range(len(lengths))]
    for row, (axes, metric, label) in enumerate(((cos_axes, "embedding_cosine", "embedding cosine (mean over passages)"),
                                                 (err_axes, "last_hidden_rel_error", "last hidden state relative error"))):
        for ax, n in zip(axes, lengths):
            part = frame[frame["seq_len"] == n]
            for name, group in fg.by_variant(part):
                fg.errorbar(ax, group, "flops_fraction", metric, name)
            ax.set_xscale("log")
            fg.mark_softmax_cost(ax, 1.0, text="softmax's own cost")
            ax.set_title(f"({next(letters)}) seq_len {n}: {'cosine' if row == 0 else 'last hidden error'}")
            ax.set_xlabel("FLOPs / softmax attention's FLOPs")
            ax.set_ylabel(label)
            fg.tidy_log(ax)
    lo = min(ax.get_ylim()[0] for ax in cos_axes)
    for ax in cos_axes:
        ax.set_ylim(lo, 1.0)
    hi = max(ax.get_ylim()[1] for ax in err_axes)
    for ax in err_axes:
        ax.set_ylim(0.0, hi)
    ax_rho, ax_call = fig.add_subplot(grid[0, -1]), fig.add_subplot(grid[1, -1])
    rho = _spearman(frame)
    for metric, style in (("last_hidden_rel_error", "o-"), ("embedding_cosine", "s--")):
        part = rho[rho["end_to_end"] == metric]
        ax_rho.plot(part["seq_len"], part["spearman"], style, color="0.25", label=f"with {metric}")
    ax_rho.axhline(0.0, color="0.6", linewidth=0.8)
    ax_rho.set_xscale("log", base=2)
    ax_rho.set_xticks(lengths, [str(n) for n in lengths])
    ax_rho.set_ylim(-1.05, 1.05)
    ax_rho.set_xlabel("seq_len")
    ax_rho.set_ylabel("Spearman of per-call rel_mse across cells")
    ax_rho.set_title(f"({next(letters)}) does the per-call gap rank the model gap?")
    ax_rho.legend(fontsize=8, loc="center left")
    longest = frame[frame["seq_len"] == lengths[-1]]
    for name, group in fg.by_variant(longest):
        ax_call.errorbar(group["call_rel_mse"], group["last_hidden_rel_error"],
                         yerr=fg._yerr(group["last_hidden_rel_error"].to_numpy(float),
                                       *fg.interval(group, "last_hidden_rel_error"), False),
                         color=fg.color(name), marker=fg.marker(name), linestyle="none", capsize=2.5)
    ax_call.set_xscale("log")
    ax_call.set_xlabel("per-call rel_mse on the model's own q, k, v")
    ax_call.set_ylabel("last hidden state relative error")
    ax_call.set_title(f"({next(letters)}) per-call vs model gap, seq_len {lengths[-1]}")
    fg.tidy_log(ax_call)
    fg.legend(fig, names, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _per_flop(part: pd.DataFrame) -> pd.DataFrame:
    """Each variant's best embedding cosine among its settings below softmax's cost, with that setting's fraction."""
    below = part[part["flops_fraction"] < 1]
    best = below.loc[below.groupby("variant")["embedding_cosine"].idxmax()]
    return best.sort_values("embedding_cosine", ascending=False)


def _fits_text(fits) -> str:
    """The caption's sentence on the fitted hybrids, from the table "fits" (empty when there is none)."""
    if fits is None or not len(fits):
        return ""
    items = "; ".join(f"{r['variant']} {int(r['steps'])} steps at lr {r['lr']:g} (training loss {r['initial_loss']:.3g} "
                      f"-> {r['final_loss']:.3g})" for _, r in fits.iterrows())
    r = fits.iloc[0]
    return (f" Fitted hybrids (window {int(r['window'])}, sliding): LoLCATs' hedgehog + window (feature_dim = d, "
            "row-max shift, mixing weight learned) and Based's taylor + window (its mixing weight alone), each fitted "
            f"once by ev.fit (Adam, seed 0, minibatches of {int(r['batch'])}) on the output error to the model's own "
            f"q, k, v of {int(r['texts'])} train passages (Genesis) of {int(r['seq_len'])} tokens, one set of "
            "parameters per layer and head (a FittedLayers bundle), then run by ev.model_gap on the same held-out "
            f"passages, replicates and seeds at every length: {items}.")


def caption(frames):
    frame = _frame(frames)
    lengths = sorted(int(n) for n in frame["seq_len"].unique())
    first = frame.iloc[0]
    lines = [
        f"all-MiniLM-L6-v2 (6 layers x 12 heads, d_head = 32) on {int(first['texts'])} held-out passages (the "
        f"Book of Exodus, KJV; ev.inputs.passages, split \"heldout\") of exactly seq_len = "
        f"{', '.join(map(str, lengths))} tokens, each passage one unpadded forward pass, with the estimator in "
        "place of softmax attention in every layer (ev.model_gap; independent noise per layer, head and replicate; "
        f"{int(first['replicates'])} replicates, error bars 95% t intervals over replicates; the exact model runs "
        "once per passage). x: the estimator's attention FLOPs over every layer, head and passage divided by exact "
        "softmax attention's on the same calls (ev.estimate_cost; the dotted line marks fraction 1, softmax's own "
        "cost). Each method keeps fixed settings, so its fraction falls as the passages grow: local window (exact "
        "attention on a block window of w keys only, ev.LocalWindow), RFA with positive features (iid) and with "
        "SDERF (the data-dependent map that did best on MiniLM in F9), EVA (window 32), Scatterbrain (window 16), "
        "LARA and Nystromformer. (a-c) Cosine between mean-pooled passage embeddings of the approximate and the "
        "exact model (mean over passages); (d-f) relative Frobenius error of the last hidden state over every "
        "token. (g) Spearman correlation across the cells of one length between the per-call rel_mse (ev.monte_carlo "
        "on the exact model's own q, k, v of every layer and passage, averaged) and the end-to-end metrics "
        f"(ev.gap_correlation); (h) that per-call gap against the end-to-end error at seq_len {lengths[-1]}."
        + _fits_text(frames.get("fits")),
    ]
    findings = []
    for n in lengths:
        ranked = _per_flop(frame[frame["seq_len"] == n])
        if len(ranked):
            findings.append(f"seq_len {n}, best cosine per method below softmax's cost: " + ", ".join(
                f"{r['variant']} {r['embedding_cosine']:.3f} (error {r['last_hidden_rel_error']:.2f}) at "
                f"{r['flops_fraction']:.2f}x" for _, r in ranked.iterrows()))
    fitted = frame[frame["variant"].isin(list(FITS))]
    for name, group in fg.by_variant(fitted):
        findings.append(f"{name}: " + ", ".join(
            f"cosine {r['embedding_cosine']:.3f} (error {r['last_hidden_rel_error']:.2f}) at {r['flops_fraction']:.2f}x "
            f"at seq_len {int(r['seq_len'])}" for _, r in group.sort_values("seq_len").iterrows()))
    window = frame[frame["estimator"] == "local_window"]
    if len(window) and len(lengths) > 1:
        w = window[window["seq_len"] == lengths[-1]].sort_values("flops_fraction").iloc[0]
        beat = frame[(frame["seq_len"] == lengths[-1]) & (frame["estimator"] != "local_window")
                     & (frame["embedding_cosine_low"] > w["embedding_cosine_high"])
                     & (frame["flops_fraction"] < 1)]
        findings.append(f"at seq_len {lengths[-1]} the local window w = {int(w['window'])} ({w['flops_fraction']:.3f}x "
                        f"softmax) reaches cosine {w['embedding_cosine']:.3f}; below softmax's cost, "
                        + (("significantly higher cosine: " + ", ".join(sorted(set(beat["variant"])))) if len(beat)
                           else "no method's cosine interval lies above the window's"))
    rho = _spearman(frame)
    for metric in ("last_hidden_rel_error", "embedding_cosine"):
        part = rho[rho["end_to_end"] == metric]
        findings.append(f"Spearman of per-call rel_mse with {metric} across cells: " + ", ".join(
            f"{r['spearman']:.2f} at {int(r['seq_len'])} ({int(r['cells'])} cells)" for _, r in part.iterrows()))
    lines.append("Findings: " + "; ".join(findings) + ".")
    return "\n\n".join(lines)
