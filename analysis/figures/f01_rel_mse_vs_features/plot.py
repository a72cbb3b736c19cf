"""F1: relative MSE against num_features for RFA's samplers and feature maps, EVA at equal cost, and the
delta-method prediction for RFA iid and hyperbolic."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from evalab import figures as fg
from evalab.measure.theory import rfa_prediction

TITLE = "Relative MSE vs num_features: RFA samplers, EVA at equal cost, delta-method theory"
NAME = "F1"
SWEEP = ["estimator", "num_features", "sampler", "feature_map", "window", "chunk_size", "flops",
         "rel_mse", "rel_mse_low", "rel_mse_high", "seq_len", "d", "replicates"]
THEORY = ["estimator", "feature_map", "sampler", "num_features", "rel_mse_predicted"]
REQUIRED = {"sweep": SWEEP, "theory": THEORY}  # table -> the columns plot() needs
RFA_VARIANTS = ("RFA iid", "RFA orthogonal", "RFA qmc", "RFA hyperbolic")


def compute(ctx, frames):
    """Delta-method prediction (docs/theory.md section 7) for RFA iid and hyperbolic on the sweep's own inputs."""
    spec = ctx.spec()
    grid = sorted(int(s) for s in frames["sweep"].query("estimator == 'rfa'")["num_features"].unique())

    def theory(spec_hash, num_features):
        rows = []
        for inputs, qkv in ctx.inputs(spec):
            for feature_map in ("positive", "hyperbolic"):
                p = rfa_prediction(qkv, feature_map=feature_map)
                for s in num_features:
                    rows.append({"estimator": "rfa", "feature_map": feature_map, "sampler": "iid", "num_features": s,
                                 "norm": inputs["norm"], "rel_variance_predicted": p["rel_variance_1"] / s,
                                 "rel_bias2_predicted": p["rel_bias2_1"] / s**2,
                                 "rel_mse_predicted": p["rel_variance_1"] / s + p["rel_bias2_1"] / s**2})
        return pd.DataFrame(rows)

    return {"theory": ctx.table("theory", theory, spec_hash=spec.hash, num_features=grid)}


def _split(frames):
    rows = fg.with_variant(fg.require_frame(frames, "sweep", SWEEP, NAME))
    theory = fg.with_variant(fg.require_frame(frames, "theory", THEORY, NAME))
    iid = rows[rows["variant"] == "RFA iid"]
    if iid.empty:
        raise ValueError(f"{NAME}: the sweep has no RFA iid rows (needed for the equal-cost axis)")
    per_feature = float((iid["flops"] / iid["num_features"]).median())
    rows = rows.assign(equal_cost_features=rows["flops"] / per_feature)
    return rows, theory, per_feature


def plot(frames):
    rows, theory, per_feature = _split(frames)
    softmax = fg.softmax_flops(rows[:1])
    fig, (ax, ax_cost) = plt.subplots(1, 2, figsize=(12, 4.6))
    for a in (ax, ax_cost):
        a.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax_cost.set_xscale("log")
    names = []
    for name, group in fg.by_variant(rows):
        names.append(name)
        if name in RFA_VARIANTS or group["estimator"].iloc[0] == "rfa":
            fg.errorbar(ax, group, "num_features", "rel_mse", name)
        else:  # EVA and local attention: at the num_features of RFA iid with the same FLOPs
            fg.errorbar(ax, group, "equal_cost_features", "rel_mse", name, linestyle="--", markerfacecolor="white")
            key, short = ("window", "w") if name == "local window" else ("chunk_size", "c")
            for _, r in group.iterrows():
                ax.annotate(f"{short}={int(r[key])}", (r["equal_cost_features"], r["rel_mse"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=fg.color(name))
        fg.errorbar(ax_cost, group, "flops", "rel_mse", name)
    for name, group in fg.by_variant(theory):
        group = group.sort_values("num_features")
        ax.plot(group["num_features"], group["rel_mse_predicted"], color=fg.color(name), linestyle=":", linewidth=2)
    fg.mark_softmax_cost(ax, softmax / per_feature)
    fg.mark_softmax_cost(ax_cost, softmax)
    fg.value_ticks(ax, rows[rows["estimator"] == "rfa"]["num_features"])
    ax.set_xlabel("num_features  (EVA, local window: RFA iid num_features of equal flops)")
    ax.set_ylabel("rel_mse")
    ax.set_title("(a) error vs num_features")
    ax_cost.set_xlabel("flops per replicate")
    ax_cost.set_ylabel("rel_mse")
    ax_cost.set_title("(b) error vs cost")
    for a in (ax, ax_cost):
        fg.tidy_log(a)
    extra = [fg.softmax_cost_handle("softmax's own cost (exact)"),
             Line2D([], [], color="0.3", linestyle=":", linewidth=2, label="delta-method prediction"),
             Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white",
                    label="placed at equal cost")]
    fg.legend(fig, names, extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _slope(group, x, y):
    g = group[(group[y] > 0)]
    return float(np.polyfit(np.log(g[x]), np.log(g[y]), 1)[0]) if len(g) > 1 else float("nan")


def caption(frames):
    rows, theory, per_feature = _split(frames)
    softmax = float(fg.softmax_flops(rows[:1])[0])
    iid = rows[rows["variant"] == "RFA iid"].sort_values("num_features")
    s_max, s_min = int(iid["num_features"].max()), int(iid["num_features"].min())
    at = lambda name, s: rows[(rows["variant"] == name) & (rows["num_features"] == s)]["rel_mse"]
    pred = theory[(theory["variant"] == "RFA iid")].set_index("num_features")["rel_mse_predicted"]
    lines = [
        f"Relative MSE (rel_mse = mean_n |Yhat_n - Y_n|^2 / mean_n |Y_n|^2) of RFA with positive features drawn "
        f"iid, orthogonal or QMC (scrambled Sobol), and with antithetic (hyperbolic) features, against "
        f"num_features S (omega draws), on synthetic Gaussian inputs ({fg.sizes(rows)}). Error bars: 95% intervals. "
        "Dotted: the delta-method prediction variance + |bias|^2 (evalab.measure.theory.rfa_bias_variance) for iid and "
        "hyperbolic features on the same inputs. EVA (window 32, chunk_size c, one sample per chunk) and "
        "window-only local attention (window w) are placed in panel (a) at the num_features that gives RFA iid "
        f"the same FLOPs per replicate ({per_feature:.3g} FLOPs per feature here); panel (b) plots every "
        "estimator against its FLOPs directly. The dash-dot vertical line is exact softmax's own cost "
        f"({softmax:.3g} FLOPs, the num_features S = {softmax / per_feature:.0f} in panel (a)): points to its right "
        "cost more than the attention they approximate.",
    ]
    others = [f"{name.removeprefix('RFA ')} {float(at(name, s_max).iloc[0] / at('RFA iid', s_max).iloc[0]):.2f}"
              for name in RFA_VARIANTS[1:] if len(at(name, s_max))]
    lines.append(
        f"Findings: RFA iid falls from {iid['rel_mse'].iloc[0]:.3g} at S = {s_min} to {iid['rel_mse'].iloc[-1]:.3g} "
        f"at S = {s_max} (log-log slope {_slope(iid, 'num_features', 'rel_mse'):.2f}; theory: -1); "
        f"measured / predicted = {iid['rel_mse'].iloc[0] / pred.get(s_min, np.nan):.2f} at S = {s_min} and "
        f"{iid['rel_mse'].iloc[-1] / pred.get(s_max, np.nan):.2f} at S = {s_max}. At S = {s_max}, rel_mse relative "
        f"to iid: {', '.join(others)} (hyperbolic costs twice the feature columns)."
    )
    eva = rows[rows["variant"] == "EVA"].sort_values("rel_mse")
    if len(eva):
        best = eva.iloc[0]
        s_eq = best["equal_cost_features"]
        rfa_there = float(np.exp(np.interp(np.log(s_eq), np.log(iid["num_features"]), np.log(iid["rel_mse"]))))
        lines.append(
            f"The best EVA (c = {int(best['chunk_size'])}) reaches rel_mse {best['rel_mse']:.3g} at the cost of RFA iid "
            f"with S = {s_eq:.0f}, where RFA iid has about {rfa_there:.3g} (interpolated): EVA is "
            f"{'better' if best['rel_mse'] < rfa_there else 'worse'} at equal cost on these inputs."
        )
    dearer = [f"{name} {int((group['flops'] > softmax).sum())} of {len(group)}" for name, group in fg.by_variant(rows)]
    lines.append("Points costing more than exact softmax: " + ", ".join(dearer) + ".")
    local = rows[rows["variant"] == "local window"].sort_values("window")
    if len(local):
        lines.append("Window-only local attention (deterministic, all bias): rel_mse " + ", ".join(
            f"{r['rel_mse']:.3g} (w = {int(r['window'])})" for _, r in local.iterrows()) + ".")
    return "\n\n".join(lines)
