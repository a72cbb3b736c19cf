"""Feature maps phi of linear attention, on scaled coordinates x = sqrt(scale) q (docs/theory.md, "Feature maps
and window hybrids"): the fixed ones (elu + 1, relu, taylor, dpfp) and the learned ones (t2r, hedgehog, rebased),
whose weights (*heads, r, d) and biases (*heads, r) (rebased: (*heads, d) both) broadcast against the batch axes
of x (*b, L, d).

Each function returns the features (*b, L, F) only; the estimators add the constant guard column of maps that can
vanish for every key (relu, dpfp, t2r, rebased: see evalab.estimators.linear).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Hedgehog variants: two softmaxes over the feature axis (the Hedgehog paper's form as LoLCATs releases it,
#: ``softmax_dim``), one softmax over [2u, -2u] (flash-linear-attention's HedgehogFeatureMap), and the paper's
#: [exp(u), exp(-u)] (stabilised by factors that cancel in the attention ratio).
HEDGEHOG_VARIANTS = ("softmax", "joint_softmax", "exp")
#: The epsilon of ReBased's layer norm (torch's and flash-linear-attention's default).
LAYER_NORM_EPS = 1e-5


def elu(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (Katharopoulos et al. 2020): (*b, L, d)."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x): (*b, L, d); may vanish."""
    return torch.relu(x)


def taylor_columns(d: int) -> int:
    """Features of the taylor map: 1 + d + d (d + 1) / 2."""
    return 1 + d + d * (d + 1) // 2


def taylor(x: torch.Tensor) -> torch.Tensor:
    """The second-order Taylor map of Based: [1, x, x_i^2 / sqrt 2 (i = 1..d), x_i x_j (i < j, row-major)], so
    that phi(x).phi(y) = 1 + x.y + (x.y)^2 / 2 (flash-linear-attention's TaylorFeatureMap order): (*b, L,
    1 + d + d (d + 1) / 2)."""
    i, j = torch.triu_indices(x.shape[-1], x.shape[-1], 1, device=x.device)
    return torch.cat([torch.ones_like(x[..., :1]), x, x * x / math.sqrt(2), x[..., i] * x[..., j]], dim=-1)


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP (Schlag et al. 2021): r = [relu(x), relu(-x)], phi = [r * roll(r, j) for j = 1..nu] (rolled along
    the feature axis): (*b, L, 2 d nu); may vanish."""
    r = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    return torch.cat([r * r.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u = W x + b for x (*b, L, d), weight (*heads, r, d), bias (*heads, r): (*b, L, r)."""
    return x @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def t2r(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T2R (Kasai et al. 2021): relu(W x + b): (*b, L, r); may vanish."""
    return torch.relu(project(x, weight, bias))


def hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, variant: str = "softmax", *,
             keys: bool = False) -> torch.Tensor:
    """Hedgehog (Zhang et al. 2024) with u = W x + b: (*b, L, 2r).

    variant "softmax": [softmax(u), softmax(-u)], each over the r features; "joint_softmax": softmax([2u, -2u])
    over all 2r; "exp": [exp(u), exp(-u)] times e^{-c}, c = max |u| over the row (queries) or over every row and
    feature (``keys``): a factor that cancels in the attention ratio, so float32 stays finite.
    """
    u = project(x, weight, bias)
    if variant == "softmax":
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)
    if variant == "joint_softmax":
        return torch.softmax(torch.cat([2 * u, -2 * u], dim=-1), dim=-1)
    both = torch.cat([u, -u], dim=-1)
    top = both.amax(dim=(-2, -1) if keys else -1, keepdim=True).detach()  # cancels: no gradient through it
    return torch.exp(both - top)


def rebased(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReBased (Aksenov et al. 2024): z = layer_norm(x) * weight + bias (weight, bias (*heads, d)), then
    [z_i^2 / sqrt d, z_i z_j sqrt(2 / d) (i < j, row-major)] (flash-linear-attention's RebasedFeatureMap order), so
    that phi(x).psi(y) = (z_x.z_y)^2 / d: (*b, L, d (d + 1) / 2); may vanish."""
    d = x.shape[-1]
    z = F.layer_norm(x, (d,), eps=LAYER_NORM_EPS) * weight.unsqueeze(-2) + bias.unsqueeze(-2)
    i, j = torch.triu_indices(d, d, 1, device=x.device)
    return torch.cat([z * z / math.sqrt(d), z[..., i] * z[..., j] * math.sqrt(2 / d)], dim=-1)
