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
import torch
from matplotlib.lines import Line2D

import evalab
from evalab.report import figures as fg
from evalab.estimators.nystrom import iterative_pinv, segment_means

TITLE = "The approximation gap of the field: rel_mse (bias^2 + variance) vs FLOPs per query and vs budget"
NAME = "F10"
COLUMNS = ["estimator", "inputs", "rel_mse", "rel_mse_low", "rel_mse_high", "rel_bias2", "rel_bias2_low",
           "rel_bias2_high", "rel_variance", "rel_variance_low", "rel_variance_high", "flops", "seq_len", "d",
           "batch", "replicates"]
NYSTROM = ["norm", "num_landmarks", "seed", "condition", "residual", "rel_mse_iterative", "rel_mse_exact", "seq_len",
           "d", "pinv_iterations"]
REQUIRED = {"sweep": COLUMNS}  # table -> the columns plot() needs (caption() also reads "nystrom": NYSTROM)


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


def _rel_mse(estimator, q, k, v, exact) -> float:
    out = estimator(q, k, v, estimator.draw(q, k))[0]
    return float(((out - exact) ** 2).sum(-1).mean() / (exact**2).sum(-1).mean())


def nystrom_table(*, seq_len, d, norms, landmarks, seeds, pinv_iterations=6):
    """Nystromformer on ``seeds`` Gaussian inputs per norm (evalab.inputs.gaussian with seeds 0..seeds-1, float32
    like the sweep): the 2-norm condition number of the landmark matrix A2 = softmax_row(Xl Yl^T) (float64), the
    iteration's residual ||I - A2 Z||_2 after ``pinv_iterations`` steps, and rel_mse with the iterative and the
    exact pseudo-inverse. One row per (norm, num_landmarks, seed)."""
    rows = []
    for norm in norms:
        for seed in range(seeds):
            qkv = evalab.inputs.gaussian(seq_len=seq_len, d=d, norm=norm, seed=seed, dtype=torch.float32)
            q, k, v = qkv
            exact = evalab.softmax_attention(q, k, v)
            x, y = q.double() * math.sqrt(qkv.scale), k.double() * math.sqrt(qkv.scale)
            for m in landmarks:
                a2 = torch.softmax(segment_means(x, m) @ segment_means(y, m).T, dim=-1)
                z = iterative_pinv(a2, pinv_iterations, "exact")
                rows.append({
                    "norm": norm, "num_landmarks": m, "seed": seed, "condition": float(torch.linalg.cond(a2)),
                    "residual": float(torch.linalg.matrix_norm(torch.eye(m, dtype=a2.dtype) - a2 @ z, ord=2)),
                    "rel_mse_iterative": _rel_mse(evalab.Nystrom(num_landmarks=m, pinv_iterations=pinv_iterations),
                                                  q, k, v, exact),
                    "rel_mse_exact": _rel_mse(evalab.Nystrom(num_landmarks=m, pinv="exact"), q, k, v, exact)})
    return pd.DataFrame(rows).assign(seq_len=seq_len, d=d, pinv_iterations=pinv_iterations)


def compute(ctx, frames):
    """The figure's Gaussian sweep, plus the same estimator blocks on MiniLM's heads (when available), and the
    Nystromformer pseudo-inverses over input seeds (the sweep's inputs are one draw)."""
    gaussian = frames["sweep"]
    inputs = ctx.spec().to_dict()["inputs"]
    landmarks = sorted(int(m) for m in gaussian["num_landmarks"].dropna().unique()) \
        if "num_landmarks" in gaussian.columns else []
    nystrom = ctx.table("nystrom", nystrom_table, seq_len=int(inputs["seq_len"]), d=int(inputs["d"]),
                        norms=[float(n) for n in np.atleast_1d(inputs["norm"])], landmarks=landmarks,
                        seeds=ctx.pick(tiny=3, quick=20, full=20))
    seq_len = ctx.pick(tiny=64, quick=64, full=512)
    if not _minilm_available(seq_len):
        ctx.log("MiniLM inputs unavailable (optional packages missing): Gaussian panels only")
        return {"sweep": gaussian, "nystrom": nystrom}
    raw = ctx.spec().to_dict()
    raw.update(name=f"{raw['name']}_minilm", replicates=ctx.pick(tiny=8, quick=8, full=64),
               description="the estimator blocks of F10 on all-MiniLM-L6-v2 (full: 6 layers x 12 heads as one batch)")
    # full: every layer and head; quick and tiny: the 12 heads of the middle layer, to stay within seconds
    raw["inputs"] = {"kind": "minilm", "seq_len": seq_len, **ctx.pick(tiny={"layer": 3}, quick={"layer": 3}, full={})}
    minilm = ctx.sweep(raw, "minilm")
    return {"sweep": pd.concat([gaussian, minilm], ignore_index=True), "nystrom": nystrom}


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
        fg.mark_softmax_cost(ax_cost, fg.softmax_flops(part[:1]) / (part["batch"].iloc[0] * part["seq_len"].iloc[0]))
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
        _split_limits(ax_split, part)
        for ax in axrow:
            fg.tidy_log(ax)
    extra = [fg.softmax_cost_handle("softmax's own cost (left column)"),
             Line2D([], [], color="0.3", linestyle="-.", label="no budget axis (deterministic), at the hybrids' window"),
             Line2D([], [], color="0.3", linestyle="--", label="bias^2"),
             Line2D([], [], color="0.3", linestyle=":", marker="o", markerfacecolor="none", label="variance")]
    fg.legend(fig, names, extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _split_limits(ax, part):
    """The bias/variance panel's y-range: from a third of the smallest resolved value (a variance > 0, or a squared
    bias whose 95% interval excludes 0) up; unresolved squared biases (estimates <= 0, not drawn on a log axis)
    would otherwise stretch it down by their error bars alone."""
    budgeted = part[part["budget"].notna()]
    resolved = pd.concat([budgeted.loc[budgeted["rel_variance"] > 0, "rel_variance"],
                          budgeted.loc[budgeted["rel_bias2_low"] > 0, "rel_bias2"]])
    if len(resolved):
        ax.set_ylim(bottom=float(resolved.min()) / 3)


def _slope(group, metric="rel_mse", points=3):
    """Log-log slope of ``metric`` against the budget over the largest ``points`` budgets (nan if not positive)."""
    tail = group.sort_values("budget").tail(points)
    x, y = tail["budget"].to_numpy(float), tail[metric].to_numpy(float)
    if len(tail) < 2 or not (y > 0).all():
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


#: A variant "keeps falling" when the log-log slope over its three largest budgets is at most FALLING, "plateaus"
#: when it lies between FALLING and RISING, and "rises" (its error grows with the budget) from RISING on.
FALLING = -0.3
RISING = 0.3
#: The variants whose verdicts answer the caption's question, when present.
QUESTION = ("RFA iid", "RFA hyperbolic orthogonal", "EVA", "RA", "LARA")


def _verdict(slope):
    if not math.isfinite(slope):
        return "n/a"
    return "keeps falling" if slope <= FALLING else "plateaus" if slope < RISING else "rises"


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
                         f"(slope {slope:.2f}, {verdict}; bias^2 share "
                         f"{fg.ratio_text(last['rel_bias2'], last['rel_mse'], high=last['rel_bias2_high'], percent=True)})")
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
        "(dotted), its y-range starting a third below the smallest resolved value (unresolved squared biases, whose "
        "interval includes 0, run off its bottom). Deterministic estimators without a budget (elu+1 linear attention, which does not estimate "
        "softmax, and the softmax window alone at the hybrids' window) are horizontal lines. "
        f"Gaussian inputs: {fg.sizes(gaussian) if len(gaussian) else 'none'}."
        + (" MiniLM: all-MiniLM-L6-v2's q/k/v, the heads of the panel as one batch (d_head = 32), "
           f"seq_len {int(rows.loc[rows['inputs'] == 'minilm', 'seq_len'].iloc[0])}, "
           f"{int(rows.loc[rows['inputs'] == 'minilm', 'replicates'].iloc[0])} replicates."
           if (rows["inputs"] == "minilm").any() else " MiniLM panels: not computed (optional packages missing)."),
        "The dash-dot vertical line in the left column is exact softmax's own cost on the panel's inputs (the cost "
        "model's FLOPs of one exact call per query): at these short sequences many estimators cost more than the "
        "attention they approximate.",
        "Does RFA's error plateau as samples grow while EVA keeps falling? The slope of log rel_mse against log "
        f"budget over each variant's three largest budgets answers it (-1: falling like 1/S; between {FALLING:g} and "
        f"{RISING:g}: a plateau; from {RISING:g} on: the error rises with the budget). Measured answer: "
        + "; ".join(answer(rows)) + ".",
    ]
    text.append("Findings: " + " | ".join(findings(rows)) + ". A bias^2 share is the squared bias over rel_mse; "
                "where the unbiased bias^2 estimate is <= 0 it is not resolved from 0 and the share is bounded by its "
                "95% upper limit.")
    nystrom = fg.require_frame(frames, "nystrom", NYSTROM, NAME)
    text.append(nystrom_text(nystrom))
    return "\n\n".join(text)


def _median_range(values, fmt=".3g") -> str:
    values = np.asarray(values, dtype=float)
    return f"{np.median(values):{fmt}} [{values.min():{fmt}}, {values.max():{fmt}}]"


def nystrom_text(table) -> str:
    """The caption's Nystromformer paragraph: medians [ranges] over input seeds of cond(A2), the exact / iterative
    rel_mse ratio and the iteration's residual, at the smallest and largest landmark counts, per norm."""
    r = table.iloc[0]
    seeds, steps = table["seed"].nunique(), int(r["pinv_iterations"])
    better = table["rel_mse_iterative"] < table["rel_mse_exact"]
    residual = float(table["residual"].median())
    parts = []
    for norm, part in table.groupby("norm"):
        sizes = sorted(part["num_landmarks"].unique())
        for m in dict.fromkeys((sizes[0], min(sizes, key=lambda s: abs(s - 8)), sizes[-1])):
            at = part[part["num_landmarks"] == m]
            parts.append(f"norm {norm:g}, m = {m}: cond(A2) {_median_range(at['condition'])}, rel_mse exact / "
                         f"iterative {_median_range(at['rel_mse_exact'] / at['rel_mse_iterative'])}, "
                         f"||I - A2 Z_{steps}||_2 {_median_range(at['residual'], '.2f')}")
    return (
        f"Nystromformer's two pseudo-inverses over {seeds} Gaussian inputs of the same sizes (seq_len = "
        f"{int(r['seq_len'])}, d = {int(r['d'])}, seeds 0-{seeds - 1}; median [min, max] over seeds; the sweep's "
        "input above is one such draw, so its exact / iterative gap is one sample of a wide distribution): "
        + "; ".join(parts) + f". Over all {len(table)} (norm, m, seed) cells the iterative pseudo-inverse has the "
        f"lower rel_mse in {int(better.sum())} and its median residual ||I - A2 Z_{steps}||_2 is {residual:.2f}"
        + (": the iteration is far from converged, so Z acts only on A2's large singular directions, while the exact "
           "pseudo-inverse also inverts the small ones and amplifies the Nystrom mismatch (A1 A2^+ A3 is not the "
           "full attention matrix) by up to cond(A2). The unconverged iteration damps that amplification; that, "
           "not convergence, is why it is the more accurate of the two here (docs/theory.md section 11.2)."
           if residual > 0.5 else ": the iteration has nearly converged.")
    )
