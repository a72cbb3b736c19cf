"""F2: relative MSE against seq_len at matched cost: RFA with the num_features whose FLOPs match EVA's, EVA, and
window-only local attention."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import evalab
from evalab.report import figures as fg

TITLE = "Relative MSE vs seq_len at matched cost: RFA, EVA, local window"
NAME = "F2"
COMMON = ["estimator", "seq_len", "norm", "flops", "rel_mse", "rel_mse_low", "rel_mse_high", "d", "replicates"]
SWEEP = COMMON + ["window", "chunk_size"]
RFA = COMMON + ["num_features", "sampler", "feature_map"]
REQUIRED = {"sweep": SWEEP, "rfa_matched": RFA}  # table -> the columns plot() needs
# RFA variants added at matched cost: (sweep block parameters, what they are matched with)
MATCHED = ({"sampler": ["iid", "orthogonal"]}, {"feature_map": "hyperbolic"})


def matched_features(target_flops: float, *, seq_len: int, d: int, dv: int, **params) -> int:
    """The num_features S whose RFA FLOPs per replicate are closest to ``target_flops`` (cost is linear in S)."""
    per_feature = evalab.estimate_cost(evalab.RFA(num_features=1, **params), N=seq_len, M=seq_len, d=d, dv=dv).flops()
    return max(1, int(round(target_flops / per_feature)))


def compute(ctx, frames):
    """One generated sweep per seq_len: RFA at the num_features whose FLOPs match EVA's on the same inputs."""
    spec = ctx.spec()
    rows = frames["sweep"]
    eva = rows[(rows["estimator"] == "eva") & (rows["chunk_size"] > 0)]
    parts = []
    for seq_len, group in eva.groupby("seq_len"):
        target = float(group["flops"].iloc[0])
        d, dv = int(group["d"].iloc[0]), int(group["dv"].iloc[0])
        inputs = {**spec.inputs, "seq_len": int(seq_len)}
        blocks = []
        for block in MATCHED:
            fixed = {k: (v[0] if isinstance(v, list) else v) for k, v in block.items()}
            s = matched_features(target, seq_len=int(seq_len), d=d, dv=dv, **fixed)
            blocks.append({"name": "rfa", "num_features": s, **block})
        generated = {"name": f"{spec.name}_rfa_matched_n{int(seq_len)}", "replicates": spec.replicates, "seed": spec.seed,
                     "dtype": spec.dtype, "matrix": False, "inputs": inputs, "estimators": blocks}
        parts.append(ctx.sweep(generated, name="rfa_matched"))
    return {"rfa_matched": pd.concat(parts, ignore_index=True)}


def _rows(frames):
    sweep = fg.require_frame(frames, "sweep", SWEEP, NAME)
    matched = fg.require_frame(frames, "rfa_matched", RFA, NAME)
    return fg.with_variant(pd.concat([matched, sweep], ignore_index=True))


def plot(frames):
    rows = _rows(frames)
    norms = sorted(rows["norm"].unique())
    fig, axes = plt.subplots(1, len(norms), figsize=(5.2 * len(norms) + 1.5, 4.4), squeeze=False, sharey=True)
    for ax, norm in zip(axes[0], norms):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        part = rows[rows["norm"] == norm]
        for name, group in fg.by_variant(part):
            fg.errorbar(ax, group, "seq_len", "rel_mse", name)
            if name == "RFA iid":
                for _, r in group.iterrows():
                    ax.annotate(f"S={int(r['num_features'])}", (r["seq_len"], r["rel_mse"]), textcoords="offset points",
                                xytext=(4, 5), fontsize=7, color=fg.color(name))
        fg.value_ticks(ax, part["seq_len"])
        ax.set_title(f"scaled norm |x| = |y| = {norm:g}")
        ax.set_xlabel("seq_len")
    axes[0][0].set_ylabel("rel_mse")
    fg.legend(fig, rows["variant"], loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def caption(frames):
    rows = _rows(frames)
    text = [
        "Relative MSE against seq_len (N queries = N keys) at matched cost: for each seq_len, RFA gets the "
        "num_features S whose FLOPs per replicate (evalab.estimate_cost) equal EVA's (window 32, chunk_size 8, one "
        "sample per chunk, so N/8 chunks: EVA's cost grows like N^2/8 and the matched S grows with N; hyperbolic "
        "features cost two columns per draw, so they get half the S). Window-only local attention (window 32, "
        f"EVA with chunk_size = 0) is deterministic and cheaper than EVA. Synthetic Gaussian inputs ({fg.sizes(rows)}). "
        "Error bars: 95% intervals; labels give RFA iid's S.",
    ]
    findings = []
    for norm, part in rows.groupby("norm"):
        top = part[part["seq_len"] == part["seq_len"].max()]
        get = lambda name: top[top["variant"] == name]
        eva, iid, local = get("EVA"), get("RFA iid"), get("local window")
        if len(eva) and len(iid):
            findings.append(
                f"at norm {norm:g} and seq_len {int(top['seq_len'].iloc[0])}: EVA {eva['rel_mse'].iloc[0]:.3g}, RFA iid "
                f"(S = {int(iid['num_features'].iloc[0])}) {iid['rel_mse'].iloc[0]:.3g}, local window "
                f"{local['rel_mse'].iloc[0]:.3g}" if len(local) else "")
        wins = []
        for n, at in part.groupby("seq_len"):
            e, r = at[at["variant"] == "EVA"]["rel_mse"], at[at["variant"] == "RFA iid"]["rel_mse"]
            if len(e) and len(r):
                wins.append(f"{int(n)}: {e.iloc[0] / r.iloc[0]:.2f}")
        if wins:
            findings.append(f"EVA / RFA iid rel_mse ratio at norm {norm:g} by seq_len: " + ", ".join(wins))
    text.append("Findings: " + "; ".join(f for f in findings if f) + ".")
    return "\n\n".join(text)
