"""F10: the approximation gap of the field. Relative MSE, and its split into squared bias and variance, of every
estimator family against FLOPs per query and against its own budget (features, landmarks, draws), on Gaussian
inputs at two norms and on the q/k/v of all-MiniLM-L6-v2 (6 layers x 12 heads as one batch; quick: the 12 heads
of layer 3). The Gaussian rows are the figure's sweep; compute() runs the same estimator blocks on the "minilm"
inputs kind (skipped, with the Gaussian panels kept, without the optional model packages). Any estimator block
can be added to the spec: rows are named by their variant (label) and placed on the budget axis by BUDGETS."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

import evalab
from evalab import figures as fg

TITLE = "The approximation gap of the field: rel_mse (bias^2 + variance) vs FLOPs per query and vs budget"
NAME = "F10"
COLUMNS = ["estimator", "inputs", "rel_mse", "rel_mse_low", "rel_mse_high", "rel_bias2", "rel_bias2_low",
           "rel_bias2_high", "rel_variance", "rel_variance_low", "rel_variance_high", "flops", "seq_len", "d",
           "batch", "replicates"]
REQUIRED = {"sweep": COLUMNS}  # table -> the columns plot() needs


def _eva_draws(row):
    chunk = row.get("chunk_size")
    return math.ceil(row["seq_len"] / chunk) * row["samples_per_chunk"] if chunk else math.nan


#: Registered estimator -> its budget per replicate (samples, landmarks or features) from a result row; an
#: estimator not listed here has no budget axis and is drawn as a horizontal line (deterministic baselines).
BUDGETS = {
    "rfa": lambda row: row["num_features"],
    "scatterbrain": lambda row: row["num_features"],
    "nystrom": lambda row: row["num_landmarks"],
    "eva": _eva_draws,  # C chunks x S_c draws; none for the window alone
    "ra": lambda row: row["samples_per_query"],
    "lara": lambda row: row["num_proposals"] * row.get("samples_per_proposal", 1),
}


def _minilm_available(seq_len):
    try:
        evalab.inputs.minilm(seq_len)
    except ImportError:
        return False
    return True


def compute(ctx, frames):
    """The figure's Gaussian sweep, plus the same estimator blocks on MiniLM's heads (when available)."""
    gaussian = frames["sweep"]
    seq_len = ctx.pick(tiny=64, quick=64, full=512)
    if not _minilm_available(seq_len):
        ctx.log("MiniLM inputs unavailable (optional packages missing): Gaussian panels only")
        return {"sweep": gaussian}
    raw = ctx.spec().to_dict()
    raw.update(name=f"{raw['name']}_minilm", replicates=ctx.pick(tiny=8, quick=8, full=64),
               description="the estimator blocks of F10 on all-MiniLM-L6-v2 (full: 6 layers x 12 heads as one batch)")
    # full: every layer and head; quick and tiny: the 12 heads of the middle layer, to stay within seconds
    raw["inputs"] = {"kind": "minilm", "seq_len": seq_len, **ctx.pick(tiny={"layer": 3}, quick={"layer": 3}, full={})}
    minilm = ctx.sweep(raw, "minilm")
    return {"sweep": pd.concat([gaussian, minilm], ignore_index=True)}


def _rows(frames):
    rows = fg.with_variant(fg.require_frame(frames, "sweep", COLUMNS, NAME))
    rows["flops_per_query"] = rows["flops"] / (rows["batch"] * rows["seq_len"])
    rows["budget"] = [BUDGETS[r["estimator"]](r) if r["estimator"] in BUDGETS else math.nan
                      for r in rows.to_dict("records")]
    norm = rows["norm"] if "norm" in rows.columns else pd.Series(math.nan, index=rows.index)
    layer = rows["layer"] if "layer" in rows.columns else pd.Series(math.nan, index=rows.index)
    rows["panel"] = [f"Gaussian, norm {n:g}" if kind == "gaussian"
                     else ("MiniLM, 6 x 12 heads" if pd.isna(at) else f"MiniLM, layer {int(at)} x 12 heads")
                     if kind == "minilm" else str(kind) for kind, n, at in zip(rows["inputs"], norm, layer)]
    return rows


def _panels(rows):
    return sorted(rows["panel"].unique(), key=lambda p: (p.startswith("MiniLM"), p))


def _baselines(part):
    """Rows of variants without a budget, one line each: for a window-only variant the windows the hybrids use."""
    fixed = part[part["budget"].isna()]
    hybrid_windows = set(part.loc[part["budget"].notna() & (part["estimator"] != "rfa"), "window"].dropna()) \
        if "window" in part.columns else set()
    keep = []
    for _, group in fixed.groupby("variant"):
        if len(group) > 1 and hybrid_windows and "window" in group.columns:
            group = group[group["window"].isin(hybrid_windows)]
        keep.append(group)
    return pd.concat(keep) if keep else fixed


def plot(frames):
    rows = _rows(frames)
    panels = _panels(rows)
    fig, axes = plt.subplots(len(panels), 3, figsize=(17, 4.3 * len(panels) + 0.8), squeeze=False)
    names = []
    for axrow, panel in zip(axes, panels):
        part = rows[(rows["panel"] == panel) & (rows["variant"] != "softmax")]
        ax_cost, ax_budget, ax_split = axrow
        for ax in axrow:
            ax.set_xscale("log")
            ax.set_yscale("log")
        for name, group in fg.by_variant(part):
            names.append(name)
            fg.errorbar(ax_cost, group, "flops_per_query", "rel_mse", name, label="_nolegend_")
            budgeted = group[group["budget"].notna()]
            if len(budgeted):
                fg.errorbar(ax_budget, budgeted, "budget", "rel_mse", name, label="_nolegend_")
                fg.errorbar(ax_split, budgeted, "budget", "rel_bias2", name, linestyle="--", label="_nolegend_")
                if budgeted["rel_variance"].gt(0).any():
                    fg.errorbar(ax_split, budgeted, "budget", "rel_variance", name, linestyle=":", label="_nolegend_",
                                markerfacecolor="none")
        for _, row in _baselines(part).iterrows():
            for ax, metric in ((ax_budget, "rel_mse"), (ax_split, "rel_bias2")):
                ax.axhline(row[metric], color=fg.color(row["variant"]), linestyle="-." if ax is ax_budget else "--",
                           linewidth=1.1)
        ax_cost.set_title(f"{panel}: rel_mse vs cost")
        ax_budget.set_title(f"{panel}: rel_mse vs budget")
        ax_split.set_title(f"{panel}: bias^2 (dashed), variance (dotted)")
        ax_cost.set_xlabel("FLOPs per query (cost model)")
        for ax in (ax_budget, ax_split):
            ax.set_xlabel("samples / landmarks / features")
        ax_cost.set_ylabel("relative MSE")
        ax_split.set_ylabel("relative bias^2, variance")
        for ax in axrow:
            fg.tidy_log(ax)
    extra = [Line2D([], [], color="0.3", linestyle="-.", label="no budget axis (deterministic), at the hybrids' window"),
             Line2D([], [], color="0.3", linestyle="--", label="bias^2"),
             Line2D([], [], color="0.3", linestyle=":", marker="o", markerfacecolor="none", label="variance")]
    fg.legend(fig, names, extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _slope(group, metric="rel_mse", points=3):
    """Log-log slope of ``metric`` against the budget over the largest ``points`` budgets (nan if not positive)."""
    tail = group.sort_values("budget").tail(points)
    x, y = tail["budget"].to_numpy(float), tail[metric].to_numpy(float)
    if len(tail) < 2 or not (y > 0).all():
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


#: A variant "keeps falling" when the log-log slope over its three largest budgets is at most this.
FALLING = -0.3
#: The variants whose verdicts answer the caption's question, when present.
QUESTION = ("RFA iid", "RFA hyperbolic orthogonal", "EVA", "RA", "LARA")


def _verdict(slope):
    return "keeps falling" if slope <= FALLING else "plateaus" if math.isfinite(slope) else "n/a"


def answer(rows):
    """Per input panel, the verdict and slope of the variants of QUESTION."""
    lines = []
    for panel in _panels(rows):
        part = rows[(rows["panel"] == panel) & rows["budget"].notna()]
        verdicts = [f"{name} {_verdict(_slope(group))} (slope {_slope(group):.2f})"
                    for name, group in fg.by_variant(part) if name in QUESTION]
        lines.append(f"{panel}: " + ", ".join(verdicts))
    return lines


def findings(rows):
    """One line per input panel: each budgeted variant's rel_mse from its smallest to its largest budget, the
    log-log slope over its largest three budgets and the verdict (falling: slope <= FALLING), and the baselines."""
    lines = []
    for panel in _panels(rows):
        part = rows[(rows["panel"] == panel) & (rows["variant"] != "softmax")]
        items = []
        for name, group in fg.by_variant(part[part["budget"].notna()]):
            group = group.sort_values("budget")
            first, last, slope = group.iloc[0], group.iloc[-1], _slope(group)
            verdict = _verdict(slope)
            items.append(f"{name} {first['rel_mse']:.3g} at {first['budget']:g} -> {last['rel_mse']:.3g} "
                         f"[{last['rel_mse_low']:.3g}, {last['rel_mse_high']:.3g}] at {last['budget']:g} "
                         f"(slope {slope:.2f}, {verdict}; bias^2 share {last['rel_bias2'] / last['rel_mse']:.0%})")
        for _, row in _baselines(part).iterrows():
            items.append(f"{row['variant']} {row['rel_mse']:.3g}")
        lines.append(f"{panel}: " + "; ".join(items))
    return lines


def caption(frames):
    rows = _rows(frames)
    gaussian = rows[rows["inputs"] == "gaussian"]
    text = [
        "The field side by side. Left: relative MSE (mean over queries of |Yhat - Y|^2 over the mean |Y|^2, 95% "
        "intervals) against the cost model's FLOPs per query (the `flops` column over batch x seq_len). Middle: the "
        "same against each estimator's budget: features S for RFA (positive iid; hyperbolic orthogonal, the best "
        "features available) and Scatterbrain (block window, positive features), landmarks m for Nystromformer (the "
        "reference's 6-step iterative pseudo-inverse, initialised per head, and the exact one), draws C x S_c for EVA (more chunks at one "
        "sample each; more samples per chunk of 8), samples per query for RA, proposals x samples per proposal for "
        "LARA (when their rows are present). Right: the split into squared bias (dashed) and variance "
        "(dotted). Deterministic estimators without a budget (elu+1 linear attention, which does not estimate "
        "softmax, and the softmax window alone at the hybrids' window) are horizontal lines. "
        f"Gaussian inputs: {fg.sizes(gaussian) if len(gaussian) else 'none'}."
        + (" MiniLM: all-MiniLM-L6-v2's q/k/v, the heads of the panel as one batch (d_head = 32), "
           f"seq_len {int(rows.loc[rows['inputs'] == 'minilm', 'seq_len'].iloc[0])}, "
           f"{int(rows.loc[rows['inputs'] == 'minilm', 'replicates'].iloc[0])} replicates."
           if (rows["inputs"] == "minilm").any() else " MiniLM panels: not computed (optional packages missing)."),
        "Does RFA's error plateau as samples grow while EVA keeps falling? The slope of log rel_mse against log "
        f"budget over each variant's three largest budgets answers it (-1: falling like 1/S; above {FALLING:g}: a "
        "plateau). Measured answer: " + "; ".join(answer(rows)) + ".",
    ]
    text.append("Findings: " + " | ".join(findings(rows)) + ".")
    return "\n\n".join(text)
