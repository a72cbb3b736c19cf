"""MSE ratios of the OPRF and SDERF feature maps over the positive map: kernel (closed form, mean over pairs, in
log space) and attention (RFA rel_mse by Monte Carlo, 95% intervals), on Gaussian or MiniLM inputs.

    python analysis/feature_ratios.py gaussian            # N = M = 32, d = 8, norms 1.0 and 1.7, S = 1e2..1e4
    python analysis/feature_ratios.py minilm 128          # all 72 heads of all-MiniLM-L6-v2 at seq_len 128
"""
import math
import sys

import torch

import evalab as ev
from evalab.estimators.gerf import GerfParams
from evalab.measure.theory import _gerf_exponent, _log1mexp_neg

MAPS = ("positive", "oprf", "sderf")


def log_kernel_rel_mse(x, y, feature_map):
    """log of the mean over pairs of the one-draw relative MSE expm1(E) (E = |z|^2 for positive, the generalised
    exponential map's exponent otherwise), with the map's parameters from this head's (x, y)."""
    z = x.unsqueeze(-2) + y.unsqueeze(-3)
    z_sq = (z * z).sum(-1)
    if feature_map == "positive":
        e = z_sq
    else:
        p = GerfParams.of(feature_map, x, y)
        e = _gerf_exponent(feature_map, (p.basis * p.a.unsqueeze(-2)) @ p.basis.T if p.basis is not None else p.a[0],
                           z, z_sq)
    log_rel = e + _log1mexp_neg(e)
    return float(torch.logsumexp(log_rel.flatten(), 0) - math.log(log_rel.numel()))


def kernel_ratios(x, y, label):
    """x, y (heads, N, d) scaled: log10 of the kernel rel. MSE ratio to positive per head (independent of S)."""
    logs = {m: torch.tensor([log_kernel_rel_mse(a, b, m) for a, b in zip(x, y)]) for m in MAPS}
    for m in MAPS[1:]:
        r = (logs[m] - logs["positive"]) / math.log(10)
        print(f"{label}: kernel rel. MSE {m}/positive = 10^({r.median():.3g}) (median over {len(r)} heads; "
              f"range 10^({r.min():.3g})..10^({r.max():.3g}))")


def attention_ratios(qkv, sizes, replicates, label):
    q, k, v = qkv
    exact = ev.softmax_attention(q, k, v, scale=qkv.scale).double()
    ref_sq = (exact * exact).sum(-1).mean(-1)
    for S in sizes:
        res = {m: ev.monte_carlo(ev.RFA(num_features=S, feature_map=m, scale=qkv.scale), q, k, v,
                                 replicates=replicates, seed=0, matrix=False) for m in MAPS}
        rows = {m: r.to_frame().iloc[0] for m, r in res.items()}
        text = ", ".join(f"{m} {rows[m]['rel_mse']:.3g} [{rows[m]['rel_mse_low']:.3g}, {rows[m]['rel_mse_high']:.3g}]"
                         for m in MAPS)
        ratios = ", ".join(f"{m}/positive {rows[m]['rel_mse'] / rows['positive']['rel_mse']:.3g}" for m in MAPS[1:])
        line = f"{label} S={S}: attention rel_mse {text}; {ratios}"
        if q.dim() > 2 and q.shape[:-2].numel() > 1:  # per-head ratios too
            per_head = {m: (r.per_query["mse"].mean(-1) / ref_sq).flatten() for m, r in res.items()}
            line += "; per-head median " + ", ".join(
                f"{m}/positive {(per_head[m] / per_head['positive']).median():.3g}" for m in MAPS[1:])
        print(line, flush=True)


def main(argv):
    if argv[:1] == ["gaussian"]:
        for norm in (1.0, 1.7):
            qkv = ev.inputs.gaussian(seq_len=32, d=8, norm=norm, seed=0, dtype=torch.float32)
            root = math.sqrt(qkv.scale)
            label = f"gaussian N=32 d=8 norm={norm}"
            kernel_ratios(qkv.q[None].double() * root, qkv.k[None].double() * root, label)
            attention_ratios(qkv, (100, 1000, 10000), 200, label)
    elif argv[:1] == ["minilm"]:
        seq_len = int(argv[1]) if len(argv) > 1 else 128
        qkv = ev.inputs.minilm(seq_len)
        root = math.sqrt(qkv.scale)
        d = qkv.q.shape[-1]
        label = f"MiniLM seq_len={seq_len}"
        kernel_ratios(qkv.q.double().reshape(-1, seq_len, d) * root, qkv.k.double().reshape(-1, seq_len, d) * root,
                      label)
        attention_ratios(qkv, (64, 256, 1024), 32, label)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
