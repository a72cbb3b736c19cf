import math

import torch


def make_qkv(N=12, M=None, d=4, dv=3, batch=(), norm=0.8, seed=0, dtype=torch.float64):
    """Random q, k, v whose scaled rows have norm about ``norm`` (scale d**-0.5)."""
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    root = d**0.25  # q = x / sqrt(scale) with scale = d**-0.5
    q = torch.randn(*batch, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, M, d, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True) * norm * root
    k = k / k.norm(dim=-1, keepdim=True) * norm * root
    v = torch.randn(*batch, M, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def scaled(t, scale=None):
    s = t.shape[-1] ** -0.5 if scale is None else scale
    return t * math.sqrt(s)

