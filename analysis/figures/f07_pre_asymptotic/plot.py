"""F7: measured / predicted variance of RFA (iid positive features) against num_features at several norms: the
delta-method prediction holds at small norms and is far off at large ones (the pre-asymptotic regime)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from evalab import figures as fg
from evalab.measure.theory import rfa_prediction

TITLE = "Pre-asymptotic regime: measured / delta-method variance of RFA iid vs num_features"
NAME = "F7"
SWEEP = ["estimator", "norm", "num_features", "rel_variance", "rel_variance_low", "rel_variance_high", "seq_len",
         "d", "replicates"]
THEORY = ["norm", "rel_variance_1"]
REQUIRED = {"sweep": SWEEP, "theory": THEORY}  # table -> the columns plot() needs


def compute(ctx, frames):
    spec = ctx.spec()

    def theory(spec_hash):
        out = []
        for inputs, qkv in ctx.inputs(spec):
            p = rfa_prediction(qkv, feature_map="positive")
            out.append({"norm": inputs["norm"], **p})
        return pd.DataFrame(out)

    return {"theory": ctx.table("theory", theory, spec_hash=spec.hash)}


def _rows(frames):
    rows = fg.require_frame(frames, "sweep", SWEEP, NAME)
    rows = fg.with_variant(rows)
    rows = rows[rows["variant"] == "RFA iid"]
    if rows.empty:
        raise ValueError(f"{NAME}: the sweep has no RFA iid (positive features) rows")
    theory = fg.require_frame(frames, "theory", THEORY, NAME)
    rows = rows.merge(theory[["norm", "rel_variance_1"]], on="norm", how="inner", validate="many_to_one")
    predicted = rows["rel_variance_1"] / rows["num_features"]
    return rows.assign(predicted=predicted, ratio=rows["rel_variance"] / predicted,
                       ratio_low=rows["rel_variance_low"] / predicted, ratio_high=rows["rel_variance_high"] / predicted)


def _norm_colors(norms):
    return dict(zip(norms, sns.color_palette("flare", len(norms))))


def plot(frames):
    rows = _rows(frames)
    norms = sorted(rows["norm"].unique())
    colors = _norm_colors(norms)
    fig, (ax, ax_abs) = plt.subplots(1, 2, figsize=(12.5, 4.6))
    for a in (ax, ax_abs):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
    for norm in norms:
        part = rows[rows["norm"] == norm].sort_values("num_features")
        y = part["ratio"].to_numpy()
        err = np.vstack([y - part["ratio_low"].clip(lower=y / 100), part["ratio_high"] - y])
        ax.errorbar(part["num_features"], y, yerr=err, color=colors[norm], marker=fg.marker("RFA iid"), capsize=2.5,
                    label=f"norm {norm:g}")
        err_abs = np.vstack([part["rel_variance"] - part["rel_variance_low"].clip(lower=part["rel_variance"] / 100),
                             part["rel_variance_high"] - part["rel_variance"]])
        ax_abs.errorbar(part["num_features"], part["rel_variance"], yerr=err_abs, color=colors[norm],
                        marker=fg.marker("RFA iid"), capsize=2.5, linestyle="none")
        ax_abs.plot(part["num_features"], part["predicted"], color=colors[norm], linestyle=":", linewidth=2)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_ylabel("rel_variance measured / predicted")
    ax.set_title("(a) measured / delta-method variance")
    ax_abs.set_ylabel("rel_variance")
    ax_abs.set_title("(b) measured (points) and predicted (dotted)")
    for a in (ax, ax_abs):
        a.set_xlabel("num_features")
        fg.value_ticks(a, rows["num_features"])
        fg.tidy_log(a)
    handles = [Line2D([], [], color=colors[n], marker=fg.marker("RFA iid"), label=f"norm {n:g}") for n in norms]
    handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=2, label="delta-method (1/S)"))
    fig.legend(handles=handles, title="RFA iid, scaled |x| = |y|", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def caption(frames):
    rows = _rows(frames)
    text = [
        "RFA with iid positive features: the measured variance (rel_variance, with its 95% jackknife interval) "
        "divided by the first-order delta-method prediction rel_variance_1 / S (evalab.measure.theory.rfa_bias_variance on "
        "the same inputs), against num_features S, one line per scaled input norm. A ratio of 1 means the O(1/S) "
        "asymptotics hold; below 1 the estimator is in the pre-asymptotic regime, where its error saturates (the "
        "output is a convex combination of values, so the variance cannot follow the exponentially large "
        "first-order term) and the heavy tail of the weights makes the sample variance of a finite number of "
        f"replicates underestimate the true one. Synthetic Gaussian inputs ({fg.sizes(rows)}).",
    ]
    findings = []
    for norm, part in rows.groupby("norm"):
        part = part.sort_values("num_features")
        findings.append(
            f"norm {norm:g}: ratio {part['ratio'].iloc[0]:.2g} at S = {int(part['num_features'].iloc[0])}, "
            f"{part['ratio'].iloc[-1]:.2g} at S = {int(part['num_features'].iloc[-1])}")
    text.append("Findings: " + "; ".join(findings) + ".")
    return "\n\n".join(text)
