"""A literal, loop-per-query reading of docs/theory.md section 5 (float64, small sizes): EVA's independent reference.

It follows the written rules, not evalab's code: full Gaussian densities in the importance weights, the released
code's padding rules for the official partition spelled out position by position.
"""
import math

import torch


def log_normal(w, mean, sigma):
    """log N(w; mean, sigma^2 I), normalising constant included."""
    d = w.shape[0]
    return -0.5 * float(((w - mean) ** 2).sum()) / sigma**2 - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def eva_reference(q, k, v, noise, *, window, chunk_size, proposal, chunk_logit, partition, causal, scale=None,
                  noise_scale=1.0):
    """q, k (N, d), v (N, dv), noise (R, C, S_c, d) -> (R, N, dv)."""
    N, d = q.shape
    s = d**-0.5 if scale is None else scale
    x, y = q * math.sqrt(s), k * math.sqrt(s)
    # the released code's padding (official partition, non-causal): zero-fill to a multiple of the window, then
    # of the chunk length; chunk means divide by the full chunk length; chunks of padding only are kept
    padded = partition == "official" and not causal
    span = math.ceil(N / window) * window if padded and window else N
    L = min(chunk_size, span) if chunk_size else 0
    C = math.ceil(span / L) if chunk_size else 0
    chunks = [[m for m in range(c * L, (c + 1) * L) if m < N] for c in range(C)]  # the real members
    R = noise.shape[0]
    out = torch.zeros(R, N, v.shape[-1], dtype=torch.float64)
    logit = (x @ y.T).tolist()
    for r in range(R):
        # per chunk and sample: w_s, the weight ratio N(w_s; 0, I) / N(w_s; mu_c, sigma^2 I), the chunk's
        # K_s = sum_m xi(y_m, w_s) and sum_m xi(y_m, w_s) v_m, and w_s . x_n for every query
        samples = []
        for c, members in enumerate(chunks):
            length = L if padded else len(members)  # the divisor of the chunk means
            xbar = sum((x[m] for m in members), torch.zeros(d, dtype=torch.float64)) / length
            ybar = sum((y[m] for m in members), torch.zeros(d, dtype=torch.float64)) / length
            mu = {"zero": 0 * xbar, "mean": xbar + ybar, "half-mean": 0.5 * (xbar + ybar)}[proposal]
            per_sample = []
            for eps in noise[r, c]:
                w = mu + noise_scale * eps
                ratio = math.exp(log_normal(w, 0 * mu, 1.0) - log_normal(w, mu, noise_scale))
                xi = [math.exp(float(w @ y[m]) - float(y[m] @ y[m]) / 2) for m in members]
                K = sum(xi)
                Kv = sum((a * v[m] for a, m in zip(xi, members)), torch.zeros(v.shape[-1], dtype=torch.float64))
                per_sample.append((ratio, K, Kv, (x @ w).tolist()))
            samples.append((ybar, length, per_sample))
        for n in range(N):
            if window:
                b0 = (n // window) * window
                block = [m for m in range(b0, min(b0 + window, N))]
                keys = [m for m in block if not causal or m <= n]
                start = b0
            else:
                block, keys, start = [], [], n + 1
            logits = [logit[n][m] for m in keys]
            values = [v[m] for m in keys]
            half_x = float(x[n] @ x[n]) / 2
            for c, members in enumerate(chunks):
                if partition == "disjoint":
                    visible = bool(members) and members[-1] < start if causal else not set(members) & set(block)
                else:
                    visible = c < n // chunk_size if causal else True
                if not visible or (chunk_logit in ("exact", "rf") and not members):  # empty chunk: no mass
                    continue
                ybar, length, per_sample = samples[c]
                num, den, mass = 0.0, 0.0, 0.0
                for ratio, K, Kv, wx in per_sample:
                    a = math.exp(wx[n] - half_x) * ratio  # xi(x_n, w_s) N(w_s; 0, I) / N(w_s; mu_c, sigma^2 I)
                    num, den, mass = num + a * Kv, den + a * K, mass + a * K / len(per_sample)
                values.append(num / den if members else torch.zeros(v.shape[-1], dtype=torch.float64))
                if chunk_logit == "exact":
                    logits.append(math.log(sum(math.exp(logit[n][m]) for m in members)))
                elif chunk_logit == "rf":
                    logits.append(math.log(mass))
                elif chunk_logit == "mean":
                    logits.append(float(x[n] @ ybar) + math.log(length))
                else:
                    logits.append(float(x[n] @ ybar))
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            out[r, n] = (p.unsqueeze(-1) * torch.stack(values)).sum(0)
    return out
