"""F8: real inputs. Relative MSE per layer x head of RFA and EVA at matched cost (and window-only local attention)
on the q/k/v of all-MiniLM-L6-v2 (evalab.inputs.minilm), and the distribution of the scaled |x + y|^2 of those
inputs beside the synthetic norms of the other figures. compute() calls the Monte-Carlo engine directly
("minilm" is not a sweep inputs kind); without the optional model packages the figure is skipped."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm

import evalab
from evalab import figures as fg
from evalab.estimators.registry import estimator_parameters
from evalab.report.reproduce import FigureSkipped

TITLE = "Real inputs (all-MiniLM-L6-v2): error per layer x head at matched cost, and the |x + y|^2 they bring"
NAME = "F8"
HEADS = ["estimator", "layer", "head", "rel_mse", "seq_len", "replicates", "flops"]
OVERALL = ["estimator", "rel_mse", "rel_mse_low", "rel_mse_high", "flops"]
NORMS = ["source", "kind", "value"]
REQUIRED = {"heads": HEADS, "overall": OVERALL, "norms": NORMS}  # table -> the columns plot() needs
SYNTHETIC_NORMS = (0.5, 1.0, 1.5, 2.0)
WINDOW, CHUNK = 32, 8


def _load(seq_len):
    try:
        return evalab.inputs.minilm(seq_len)
    except ImportError as err:
        raise FigureSkipped(f"F8 needs the optional packages of evalab.inputs.minilm ({err})") from None


def _estimators(qkv):
    _, _, n, d = qkv.q.shape
    dv = qkv.v.shape[-1]
    eva = evalab.EVA(window=WINDOW, chunk_size=CHUNK, scale=qkv.scale)
    target = evalab.estimate_cost(eva, N=n, M=n, d=d, dv=dv).flops()
    per_feature = evalab.estimate_cost(evalab.RFA(num_features=1), N=n, M=n, d=d, dv=dv).flops()
    rfa = evalab.RFA(num_features=max(1, round(target / per_feature)), scale=qkv.scale)
    local = evalab.EVA(window=WINDOW, chunk_size=0, scale=qkv.scale)
    return [rfa, eva, local]


def error_tables(*, seq_len, replicates, seed, device):
    """Per-head rel_mse (rows with table = "heads") and the MCResult row of each estimator over all heads
    (table = "overall"), for RFA iid at EVA's cost, EVA and local window on minilm(seq_len)."""
    qkv = _load(seq_len).to(device=device)
    q, k, v = qkv
    exact = evalab.softmax_attention(q, k, v, scale=qkv.scale).to(torch.float64)
    ref_sq = (exact * exact).sum(-1).mean(-1).cpu()  # (layers, heads)
    heads, overall = [], []
    for est in _estimators(qkv):
        res = evalab.monte_carlo(est, q, k, v, replicates=replicates, seed=seed, reference=exact.to(q.dtype),
                                 matrix=False)
        per_head = res.per_query["mse"].mean(-1) / ref_sq
        params = {key: val for key, val in estimator_parameters(est).items() if key != "scale"}
        layers, n_heads = per_head.shape
        for layer in range(layers):
            for head in range(n_heads):
                heads.append({"estimator": evalab.estimators.registry.estimator_name(est), **params, "layer": layer, "head": head,
                              "rel_mse": float(per_head[layer, head]), "seq_len": seq_len, "replicates": replicates,
                              "flops": res.cost.flops() / (layers * n_heads)})
        frame = res.to_frame().drop(columns=["scale"])
        frame["flops"] = frame["flops"] / (layers * n_heads)  # per head, comparable with the synthetic figures
        overall.append(frame)
    return pd.concat([pd.DataFrame(heads).assign(table="heads"), *(f.assign(table="overall") for f in overall)],
                     ignore_index=True)


def norm_table(*, seq_len, samples, seed):
    """Samples of |x_n + y_m|^2 (scaled) per layer of the real inputs, and of the synthetic Gaussian inputs with
    |x| = |y| = r in the same dimension (|x + y|^2 = 2 r^2 (1 + cos), cos of uniformly random directions)."""
    qkv = _load(seq_len)
    root = math.sqrt(qkv.scale)
    x, y = qkv.q.double() * root, qkv.k.double() * root  # (layers, heads, N, d)
    layers, heads, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in range(layers):
        h = torch.randint(0, heads, (samples,), generator=g)
        i = torch.randint(0, n, (samples,), generator=g)
        j = torch.randint(0, n, (samples,), generator=g)
        z = ((x[layer, h, i] + y[layer, h, j]) ** 2).sum(-1)
        rows.append(pd.DataFrame({"source": f"MiniLM layer {layer}", "kind": "real", "value": z.numpy()}))
    rng = np.random.default_rng(seed)
    cos = 2 * rng.beta((d - 1) / 2, (d - 1) / 2, size=samples) - 1
    for r in SYNTHETIC_NORMS:
        rows.append(pd.DataFrame({"source": f"gaussian norm {r:g}", "kind": "synthetic",
                                  "value": 2 * r**2 * (1 + cos)}))
    out = pd.concat(rows, ignore_index=True)
    return out.assign(seq_len=seq_len, d=d)


def compute(ctx, frames):
    seq_len = ctx.pick(tiny=64, quick=128, full=512)
    replicates = ctx.pick(tiny=8, quick=32, full=256)
    _load(seq_len)  # skip early (before any table) when the model packages are missing
    errors = ctx.table("errors", lambda **p: error_tables(device=ctx.torch_device, **p), seq_len=seq_len,
                       replicates=replicates, seed=0)
    split = {name: part.drop(columns="table").dropna(axis=1, how="all").reset_index(drop=True)
             for name, part in errors.groupby("table")}
    norms = ctx.table("norms", norm_table, seq_len=seq_len, samples=ctx.pick(tiny=500, quick=4000, full=20000), seed=0)
    return {"heads": split["heads"], "overall": split["overall"], "norms": norms}


def _frames(frames):
    heads = fg.with_variant(fg.require_frame(frames, "heads", HEADS, NAME))
    overall = fg.with_variant(fg.require_frame(frames, "overall", OVERALL, NAME))
    norms = fg.require_frame(frames, "norms", NORMS, NAME)
    return heads, overall, norms


def plot(frames):
    heads, overall, norms = _frames(frames)
    heads = heads.astype({"layer": int, "head": int})
    variants = fg.ordered(heads["variant"])
    fig = plt.figure(figsize=(15, 7.8))
    grid = fig.add_gridspec(2, len(variants) + 1, width_ratios=[1] * len(variants) + [0.04], height_ratios=[0.8, 1.25],
                            wspace=0.22, hspace=0.35)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(variants))]
    cbar_ax = fig.add_subplot(grid[0, len(variants)])
    bottom = grid[1, :].subgridspec(1, 2, width_ratios=[2, 1], wspace=0.28)  # room for the right panel's y-label
    ax_norm = fig.add_subplot(bottom[0])
    ax_layer = fig.add_subplot(bottom[1])
    positive = heads["rel_mse"][heads["rel_mse"] > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    for ax, name in zip(axes, variants):
        part = heads[heads["variant"] == name]
        table = part.pivot(index="layer", columns="head", values="rel_mse")
        sns.heatmap(table, ax=ax, norm=norm, cmap="mako_r", cbar=ax is axes[0], cbar_ax=cbar_ax if ax is axes[0] else None,
                    cbar_kws={"label": "rel_mse of the head"}, linewidths=0.3, linecolor="white", square=True)
        if part["estimator"].iloc[0] == "rfa":
            detail = f"S = {int(part['num_features'].iloc[0])}"
        else:
            chunk = int(part["chunk_size"].iloc[0])
            detail = f"w = {int(part['window'].iloc[0])}" + (f", c = {chunk}" if chunk else "")
        row = overall[overall["variant"] == name]
        total = f": all heads {row['rel_mse'].iloc[0]:.3g}" if len(row) else ""
        ax.set_title(f"{name} ({detail}){total}", color=fg.color(name), fontsize=10.5)
        ax.set_xlabel("head")
        ax.set_ylabel("layer" if ax is axes[0] else "")
        ax.tick_params(axis="y", rotation=0)
    # per-layer median over heads
    ax_layer.set_yscale("log")
    for name in variants:
        med = heads[heads["variant"] == name].groupby("layer")["rel_mse"].median()
        ax_layer.plot(med.index, med.to_numpy(), color=fg.color(name), marker=fg.marker(name), label=name)
    ax_layer.set_xlabel("layer")
    ax_layer.set_ylabel("rel_mse, median over heads")
    ax_layer.set_title("per layer (matched cost for RFA / EVA)")
    ax_layer.legend(fontsize=8.5)
    fg.tidy_log(ax_layer)
    # input scale of real vs synthetic inputs
    real = norms[norms["kind"] == "real"]
    synthetic = norms[norms["kind"] == "synthetic"]
    real_names, synth_names = sorted(real["source"].unique()), sorted(synthetic["source"].unique())
    colors = dict(zip(real_names, sns.color_palette("crest", len(real_names))))
    colors.update(zip(synth_names, sns.color_palette("Greys", len(synth_names) + 1)[1:]))
    sns.ecdfplot(data=real, x="value", hue="source", palette=colors, ax=ax_norm, log_scale=True, linewidth=1.6,
                 legend=False)
    sns.ecdfplot(data=synthetic, x="value", hue="source", palette=colors, ax=ax_norm, linewidth=1.3, linestyle="--",
                 legend=False)
    ax_norm.set_xlabel("|x + y|^2  (scaled q_n + k_m)")
    ax_norm.set_ylabel("ECDF over (head, query, key)")
    ax_norm.set_title("input scale: real (solid) vs synthetic norms of the other figures (dashed)")
    handles = [plt.Line2D([], [], color=colors[n], label=n) for n in real_names]
    handles += [plt.Line2D([], [], color=colors[n], linestyle="--", label=n) for n in synth_names]
    ax_norm.set_xlim(right=float(norms["value"].max()) * 40)  # room on the right for the legend
    ax_norm.legend(handles=handles, fontsize=8, loc="center right")
    return fig


def caption(frames):
    heads, overall, norms = _frames(frames)
    n, reps = int(heads["seq_len"].iloc[0]), int(heads["replicates"].iloc[0])
    text = [
        f"Real attention inputs: q, k, v of all 6 layers x 12 heads of all-MiniLM-L6-v2 (d_head = 32) on the first "
        f"{n} tokens of Genesis 1-4 (KJV), evalab.inputs.minilm({n}). Heatmaps: relative MSE of each head "
        f"(mean over queries of |Yhat - Y|^2 over the head's mean |Y|^2; {reps} replicates) for EVA (window "
        f"{WINDOW}, chunk_size {CHUNK}, one sample per chunk), RFA iid with the num_features whose FLOPs per head "
        "match EVA's, and window-only local attention; titles give the aggregate over all heads (its 95% interval "
        "is in the stored table). Bottom left: the ECDF of |x + y|^2 (scaled q_n + k_m, over random head, query and "
        "key triples) per layer, beside the synthetic Gaussian inputs of the other figures at the same d (dashed; "
        "|x| = |y| = norm, so |x + y|^2 = 2 norm^2 (1 + cos)). RFA's kernel variance grows like exp(|x + y|^2). "
        "Bottom right: per layer, the median over its 12 heads of each head's rel_mse, for the same three "
        "estimators (RFA and EVA at matched cost), log scale.",
    ]
    findings = []
    for name, part in heads.groupby("variant"):
        row = overall[overall["variant"] == name]
        agg = "n/a"
        if len(row):
            r = row.iloc[0]
            agg = f"{r['rel_mse']:.3g} [{r['rel_mse_low']:.3g}, {r['rel_mse_high']:.3g}]"
        worst = part.sort_values("rel_mse").iloc[-1]
        findings.append(f"{name}: all heads {agg}, median head {part['rel_mse'].median():.3g}, worst head "
                        f"{worst['rel_mse']:.3g} (layer {int(worst['layer'])}, head {int(worst['head'])})")
    real = norms[norms["kind"] == "real"]["value"]
    synth = norms[norms["source"] == f"gaussian norm {max(SYNTHETIC_NORMS):g}"]["value"]
    findings.append(f"median |x + y|^2 of the real inputs {real.median():.3g} (90th percentile {real.quantile(0.9):.3g}) "
                    f"vs {synth.median():.3g} for the largest synthetic norm {max(SYNTHETIC_NORMS):g}")
    text.append("Findings: " + "; ".join(findings) + ".")
    return "\n\n".join(text)
