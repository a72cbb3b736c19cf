"""F6: the accuracy-cost frontier: FLOPs per replicate against rel_mse for every estimator and hyper-parameter,
with each variant's Pareto frontier."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from evalab.report import figures as fg

TITLE = "Accuracy-cost frontier: rel_mse vs FLOPs per replicate, Pareto frontier per estimator"
NAME = "F6"
COLUMNS = ["estimator", "norm", "flops", "rel_mse", "rel_mse_low", "rel_mse_high", "seq_len", "d", "replicates"]
REQUIRED = {"sweep": COLUMNS}  # table -> the columns plot() needs


def _rows(frames):
    """The sweep rows with a variant column, and the variants left out for want of a cost model (NaN flops:
    estimators without a ``cost`` method)."""
    rows = fg.with_variant(fg.require_frame(frames, "sweep", COLUMNS, NAME))
    costed = np.isfinite(rows["flops"].to_numpy(float))
    return rows[costed], fg.ordered(set(rows["variant"][~costed]) - set(rows["variant"][costed]))


def plot(frames):
    rows, _ = _rows(frames)
    norms = sorted(rows["norm"].unique())
    fig, axes = plt.subplots(1, len(norms), figsize=(5.6 * len(norms) + 1.6, 4.8), squeeze=False, sharey=True)
    names = []
    for ax, norm in zip(axes[0], norms):
        part = rows[rows["norm"] == norm]
        ax.set_xscale("log")
        ax.set_yscale("log")
        fg.mark_softmax_cost(ax, fg.softmax_flops(part))
        for name, group in fg.by_variant(part[part["variant"] != "softmax"]):
            names.append(name)
            fg.errorbar(ax, group, "flops", "rel_mse", name, line=False, alpha=0.35, markersize=4, capsize=0,
                        label="_nolegend_")
            front = fg.pareto_front(group, "flops", "rel_mse")
            ax.plot(front["flops"], front["rel_mse"], color=fg.color(name), marker=fg.marker(name), linewidth=2,
                    markersize=6, drawstyle="steps-post")
        ax.set_title(f"scaled norm |x| = |y| = {norm:g}")
        ax.set_xlabel("flops per replicate")
        fg.tidy_log(ax)
    axes[0][0].set_ylabel("rel_mse")
    extra = [fg.softmax_cost_handle()]
    extra += [Line2D([], [], color="0.3", marker="o", alpha=0.35, linestyle="none", label="every hyper-parameter"),
              Line2D([], [], color="0.3", linewidth=2, drawstyle="steps-post", label="Pareto frontier")]
    fg.legend(fig, names, extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _dearer_than_softmax(rows, softmax_flops):
    """Per variant, how many of its points cost more than exact softmax: "EVA 30 of 36, RFA iid 2 of 6, ..."."""
    counts = [f"{name} {int((group['flops'] > softmax_flops).sum())} of {len(group)}"
              for name, group in fg.by_variant(rows)]
    return ", ".join(counts)


def _cheapest_below(group, level):
    ok = group[group["rel_mse"] <= level]
    return float(ok["flops"].min()) if len(ok) else np.nan


def caption(frames):
    rows, uncosted = _rows(frames)
    text = [
        "Accuracy against cost: every estimator and hyper-parameter of the sweep as a faint point (rel_mse with "
        "its 95% interval against the cost model's FLOPs per replicate, the `flops` column: the deterministic part "
        "paid once plus one replicate), and each variant's Pareto frontier (the points no cheaper point beats) as a "
        "step line. RFA runs over num_features; EVA over window {16, 32, 64} x chunk_size {4, 8, 16} x "
        "samples_per_chunk {1, 4}; local window over window. The dash-dot vertical line is exact softmax's own cost "
        "(the cost model's FLOPs of one exact call; its rel_mse is 0): a point to its right costs more than the "
        "attention it approximates (counts per variant in the findings). "
        f"Synthetic Gaussian inputs ({fg.sizes(rows)}).",
    ]
    if uncosted:
        text.append(f"Not drawn (no cost model: the estimator defines no `cost` method): {', '.join(uncosted)}.")
    findings = []
    for norm, part in rows.groupby("norm"):
        soft = pd.Series(fg.softmax_flops(part[:1]))
        dearer = _dearer_than_softmax(part[part["variant"] != "softmax"], soft.iloc[0])
        level = 0.1
        costs = {name: _cheapest_below(g, level) for name, g in part.groupby("variant") if name != "softmax"}
        reached = {k: v for k, v in costs.items() if np.isfinite(v)}
        best = min(reached, key=reached.get) if reached else None
        line = f"norm {norm:g}: "
        if best:
            line += (f"cheapest rel_mse <= {level:g} is {best} at {reached[best]:.3g} FLOPs"
                     + (f" ({reached[best] / soft.iloc[0]:.2f} x softmax's {soft.iloc[0]:.3g})" if len(soft) else ""))
            missing = sorted(set(costs) - set(reached))
            if missing:
                line += f"; never reached by {', '.join(missing)}"
        else:
            line += f"no estimator reaches rel_mse <= {level:g}"
        lowest = part[part["variant"] != "softmax"].sort_values("rel_mse").iloc[0]
        line += f"; lowest error {lowest['rel_mse']:.3g} ({lowest['variant']}, {lowest['flops']:.3g} FLOPs)"
        line += f"; costing more than exact softmax ({soft.iloc[0]:.3g} FLOPs): {dearer}"
        findings.append(line)
    text.append("Findings: " + "; ".join(findings) + ".")
    return "\n\n".join(text)
