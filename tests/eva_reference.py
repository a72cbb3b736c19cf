"""A literal, loop-per-query reading of theory.md section 5 (float64, small sizes): EVA's independent reference."""
import math

import torch


def eva_reference(q, k, v, noise, *, window, chunk_size, proposal, chunk_logit, partition, causal, scale=None):
    """q, k (N, d), v (N, dv), noise (R, C, S_c, d) -> (R, N, dv)."""
    N, d = q.shape
    s = d**-0.5 if scale is None else scale
    x, y = q * math.sqrt(s), k * math.sqrt(s)
    C = math.ceil(N / chunk_size) if chunk_size else 0
    chunks = [list(range(c * chunk_size, min((c + 1) * chunk_size, N))) for c in range(C)]
    R = noise.shape[0]
    out = torch.zeros(R, N, v.shape[-1], dtype=torch.float64)
    for r in range(R):
        for n in range(N):
            if window:
                b0 = (n // window) * window
                keys = [m for m in range(b0, min(b0 + window, N)) if not causal or m <= n]
                start = b0
            else:
                keys, start = [], n + 1
            logits = [float(x[n] @ y[m]) for m in keys]
            values = [v[m] for m in keys]
            for c, members in enumerate(chunks):
                if partition == "disjoint":
                    visible = members[-1] < start if causal else not set(members) & set(keys if not causal else range(start, start + window) if window else [])
                else:
                    visible = c < n // chunk_size if causal else True
                if not visible:
                    continue
                if proposal == "zero":
                    mu = torch.zeros(d, dtype=torch.float64)
                else:
                    mu = x[members].mean(0) + y[members].mean(0)
                    mu = 0.5 * mu if proposal == "half-mean" else mu
                num, den = 0.0, 0.0
                for eps in noise[r, c]:
                    w = mu + eps
                    a = math.exp(float(w @ x[n]) - float(x[n] @ x[n]) / 2) * math.exp(-float(w @ w) / 2 + float((w - mu) @ (w - mu)) / 2)
                    for m in members:
                        xi = math.exp(float(w @ y[m]) - float(y[m] @ y[m]) / 2)
                        num = num + a * xi * v[m]
                        den = den + a * xi
                beta = num / den
                ybar = y[members].mean(0)
                if chunk_logit == "exact":
                    logit = math.log(sum(math.exp(float(x[n] @ y[m])) for m in members))
                elif chunk_logit == "mean":
                    logit = float(x[n] @ ybar) + math.log(len(members))
                else:
                    logit = float(x[n] @ ybar)
                logits.append(logit)
                values.append(beta)
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            out[r, n] = (p.unsqueeze(-1) * torch.stack(values)).sum(0)
    return out
