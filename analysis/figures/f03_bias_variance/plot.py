"""F3: squared bias against variance per estimator (log-log), both with 95% intervals, and the diagonal
bias^2 = variance."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from evalab.report import figures as fg

TITLE = "Squared bias vs variance: RFA over num_features, EVA over samples_per_chunk"
NAME = "F3"
COLUMNS = ["estimator", "norm", "num_features", "samples_per_chunk", "rel_variance", "rel_variance_low",
           "rel_variance_high", "rel_bias2", "rel_bias2_low", "rel_bias2_high", "seq_len", "d", "replicates"]
REQUIRED = {"sweep": COLUMNS}  # table -> the columns plot() needs


def _rows(frames):
    rows = fg.with_variant(fg.require_frame(frames, "sweep", COLUMNS, NAME))
    size = np.where(rows["estimator"] == "rfa", rows["num_features"], rows["samples_per_chunk"])
    return rows.assign(size_param=size)


LABELLED = ("RFA iid", "EVA")  # the variants whose first and last points carry their S (or s/chunk) label


def plot(frames):
    rows = _rows(frames)
    norms = sorted(rows["norm"].unique())
    fig, axes = plt.subplots(1, len(norms), figsize=(5.4 * len(norms) + 1.8, 4.8), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        part = rows[rows["norm"] == norm]
        ax.set_xscale("log")
        ax.set_yscale("log")
        # an unresolved bias2 (estimate <= 0) is drawn at its 95% upper bound, hollow and pointing down
        resolved_all = part["rel_bias2"] > 0
        shown = np.where(resolved_all, part["rel_bias2"], part["rel_bias2_high"])
        positive = shown[shown > 0]
        floor = positive.min() / 4 if len(positive) else 1e-6  # only for an upper bound <= 0 too
        for name, group in fg.by_variant(part):
            group = group.sort_values("size_param")
            x, y = group["rel_variance"].to_numpy(float), group["rel_bias2"].to_numpy(float)
            resolved = y > 0
            xlo, xhi = fg.interval(group, "rel_variance")
            ylo, yhi = fg.interval(group, "rel_bias2")
            y_plot = fg.log_positive(np.where(resolved, y, yhi), floor)
            ax.plot(x[resolved], y[resolved], color=fg.color(name), linewidth=0.8, alpha=0.6)
            ax.errorbar(x[resolved], y[resolved], xerr=[x[resolved] - xlo[resolved], xhi[resolved] - x[resolved]],
                        yerr=[y[resolved] - np.where(ylo[resolved] > 0, ylo[resolved], y[resolved] / 100),
                              yhi[resolved] - y[resolved]],
                        color=fg.color(name), marker=fg.marker(name), linestyle="none", capsize=2, markersize=6)
            if (~resolved).any():
                hidden = ~resolved
                ax.errorbar(x[hidden], y_plot[hidden], xerr=[x[hidden] - xlo[hidden], xhi[hidden] - x[hidden]],
                            color=fg.color(name), marker="v", markerfacecolor="white", linestyle="none", capsize=2,
                            markersize=6, alpha=0.8)
            if name in LABELLED:
                key = "S" if group["estimator"].iloc[0] == "rfa" else "s/chunk"
                for i in (0, len(group) - 1):
                    ax.annotate(f"{key}={int(group['size_param'].iloc[i])}", (x[i], y_plot[i]), textcoords="offset points",
                                xytext=(5, 4), fontsize=7.5, color=fg.color(name))
        xlim = (part["rel_variance_low"].min() / 2, part["rel_variance_high"].max() * 2)
        ylim = ((positive.min() if len(positive) else floor) / 3, max(part["rel_bias2_high"].max(), part["rel_variance"].max()) * 2)
        span = [min(xlim[0], ylim[0]), max(xlim[1], ylim[1])]
        ax.plot(span, span, color="0.4", linestyle="--", linewidth=1)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        fg.tidy_log(ax)
        ax.set_xlabel("rel_variance")
        ax.set_ylabel("rel_bias2")
        ax.set_title(f"scaled norm |x| = |y| = {norm:g}")
    extra = [Line2D([], [], color="0.4", linestyle="--", label="rel_bias2 = rel_variance"),
             Line2D([], [], color="0.4", marker="v", markerfacecolor="white", linestyle="none",
                    label="rel_bias2 <= 0 (not resolved):\nits 95% upper bound")]
    fg.legend(fig, rows["variant"], extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _ratio(row):
    """rel_bias2 / rel_variance of one row, never negative (a bound when rel_bias2 is not resolved from 0)."""
    return fg.ratio_text(row["rel_bias2"], row["rel_variance"], high=row["rel_bias2_high"])


def _bias2(row):
    return fg.ratio_text(row["rel_bias2"], 1.0, high=row["rel_bias2_high"])


def caption(frames):
    rows = _rows(frames)
    text = [
        "Squared bias (rel_bias2, the unbiased estimate |Ybar - Y|^2 - variance/R, relative to mean |Y|^2) against "
        "variance (rel_variance) of each estimator, log-log, with 95% intervals on both axes; dashed: bias^2 = "
        "variance. RFA points run over num_features S (labels give RFA iid's smallest and largest S; the other "
        "RFA variants run over the same S), EVA (window 32, chunk_size 8) over samples_per_chunk. Where the "
        "estimate of rel_bias2 is <= 0 (bias not resolved from zero with this many replicates) a hollow "
        f"downward triangle marks its 95% upper bound instead, and the line skips it. Synthetic Gaussian inputs ({fg.sizes(rows)}).",
    ]
    findings = []
    for norm, part in rows.groupby("norm"):
        iid = part[part["variant"] == "RFA iid"].sort_values("num_features")
        if len(iid):
            first, last = iid.iloc[0], iid.iloc[-1]
            findings.append(
                f"norm {norm:g}: RFA iid bias2/variance = {_ratio(first)} at S = {int(first['num_features'])} and "
                f"{_ratio(last)} at S = {int(last['num_features'])} (first order: bias2 = O(1/S^2), variance = O(1/S), "
                "so the ratio falls like 1/S)")
        eva = part[part["variant"] == "EVA"].sort_values("samples_per_chunk")
        if len(eva):
            findings.append(
                f"EVA variance {eva['rel_variance'].iloc[0]:.3g} -> {eva['rel_variance'].iloc[-1]:.3g} and bias2 "
                f"{_bias2(eva.iloc[0])} -> {_bias2(eva.iloc[-1])} from "
                f"{int(eva['samples_per_chunk'].iloc[0])} to {int(eva['samples_per_chunk'].iloc[-1])} samples per chunk")
    unresolved = int((rows["rel_bias2"] <= 0).sum())
    text.append("Findings: " + "; ".join(findings) + f". {unresolved} of {len(rows)} points have rel_bias2 <= 0 "
                "(not resolved from 0: their ratios are given as bounds from the 95% upper limit).")
    return "\n\n".join(text)
