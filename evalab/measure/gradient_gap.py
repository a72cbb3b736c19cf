"""The gradient gap (docs/theory.md section 14): bias and variance of the gradient of a scalar loss of the
attention output with respect to q, k and v, against the gradient through exact softmax attention.

    res = ev.gradient_gap(ev.RFA(num_features=64), q, k, v, replicates=200, seed=0)
    res                 # grad_q_rel_mse, grad_q_rel_variance, grad_q_rel_bias2, ... with 95% intervals
    res.to_frame()      # one tidy row, ``_low``/``_high`` bounds as MCResult's

Estimators are pure torch functions of (q, k, v, draw), so autograd differentiates each replicate's estimate.
Replicate r's noise is monte_carlo's for the same seed (common random numbers with ev.monte_carlo). The default
loss is a fixed random projection <P, Y> with P ~ N(0, 1) of the output's shape, seeded by ``seed``.
For each of q, k, v with exact gradient G (rows G_i: one per query or key position, over batch elements) and
replicate gradients g_r: variance = mean_i of the unbiased variance of g_r,i summed over features, bias2 =
mean_i |mean_r g_r,i - G_i|^2 - variance / R, mse = variance + bias2; ``rel_`` versions divide by mean_i |G_i|^2.
Intervals: grouped jackknife over GROUPS groups of replicates, as monte_carlo's summed metrics.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks
from ..estimators.draw import gaussian_noise, seeded_generator
from .intervals import jackknife_interval
from .monte_carlo import GROUPS, NOISE_BLOCK, iter_draws
from .result import Result, estimator_columns

INPUTS = ("q", "k", "v")
METRICS = ("mse", "variance", "bias2", "rel_mse", "rel_variance", "rel_bias2")
LOSS_PURPOSE = 0x6C6F73  # "los"


def projection_loss(shape: tuple[int, ...], seed: int, dtype=torch.float64, device="cpu") -> Callable:
    """The default loss: y -> sum(P * y) with P ~ N(0, 1) of ``shape``, fixed by ``seed``."""
    p = gaussian_noise(*shape, generator=seeded_generator(seed, LOSS_PURPOSE)).to(dtype=dtype, device=device)
    return lambda y: (p * y).sum()


def _softmax_reference(q, k, v, scale, causal):
    """Plain exact softmax attention in float64, differentiable: (*b, N, dv)."""
    logits = scale * q @ k.transpose(-1, -2)
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        logits = logits.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n), -math.inf)
    return logits.softmax(-1) @ v


def _gradients(fn, loss, inputs) -> tuple[torch.Tensor, ...]:
    """d loss(fn(*inputs)) / d inputs by plain autograd: the estimators keep the intermediates autograd saves
    whenever it records the call."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        value = loss(fn(*leaves))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss must return a scalar tensor, got {type(value).__name__} "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
        return torch.autograd.grad(value.reshape(()), leaves, allow_unused=True)


@dataclass(frozen=True, repr=False)  # the repr of Result
class GradientGap(Result):
    """Gradient bias/variance of one estimator on one input: metrics name -> Estimate, named
    ``grad_{q,k,v}_{mse,variance,bias2,rel_mse,rel_variance,rel_bias2}``; ``exact`` the softmax gradients."""

    estimator: object
    replicates: int
    seed: int
    sizes: dict
    metrics: dict
    exact: dict = field(repr=False)

    def columns(self) -> dict:
        return {**estimator_columns(self.estimator), **self.sizes, "replicates": self.replicates, "seed": self.seed}

    def title(self) -> str:
        return f"GradientGap({type(self.estimator).__name__}, replicates={self.replicates}, seed={self.seed}, {self.sizes})"


def _summaries(sum_d: torch.Tensor, sum_sq: torch.Tensor, n: float, power: float) -> dict:
    """Metrics from the sums over n replicates of d = g - G (rows x features) and |d_row|^2 (rows)."""
    mean_d = sum_d / n
    variance = ((sum_sq - n * (mean_d * mean_d).sum(-1)) / (n - 1)).clamp_min(0.0)
    bias2 = (mean_d * mean_d).sum(-1) - variance / n
    out = {"variance": float(variance.mean()), "bias2": float(bias2.mean())}
    out["mse"] = out["variance"] + out["bias2"]
    out.update({f"rel_{key}": value / power for key, value in list(out.items())})
    return out


def gradient_gap(estimator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, replicates: int, seed: int = 0,
                 loss: Callable | None = None) -> GradientGap:
    """Bias and variance of d loss(estimate) / d(q, k, v) against d loss(softmax attention) / d(q, k, v).

    q (*b, N, d), k (*b, M, d), v (*b, M, dv). ``loss`` maps an output (*b, N, dv) to a scalar tensor (default:
    a fixed random projection, :func:`projection_loss`). The reference is exact softmax attention in float64
    with the estimator's scale and causality; replicates run in q's dtype, one backward pass each.
    """
    _checks.integer("replicates", replicates, minimum=2)
    _checks.integer("seed", seed, minimum=0)
    causal = bool(getattr(estimator, "causal", False))
    _checks.qkv(q, k, v, causal=causal)
    scale = _checks.resolve_scale(getattr(estimator, "scale", None), q.shape[-1])
    if loss is None:
        loss = projection_loss(q.shape[:-1] + v.shape[-1:], seed, device=q.device)
    exact = _gradients(lambda *t: _softmax_reference(*t, scale, causal), loss, [t.double() for t in (q, k, v)])
    exact = [torch.zeros_like(t, dtype=torch.float64) if g is None else g for g, t in zip(exact, (q, k, v))]
    groups = min(GROUPS, replicates)
    sums = {name: torch.zeros(groups, *g.shape, dtype=torch.float64) for name, g in zip(INPUTS, exact)}
    squares = {name: torch.zeros(groups, *g.shape[:-1], dtype=torch.float64) for name, g in zip(INPUTS, exact)}
    for start, draw in iter_draws(estimator, q, k, replicates, seed, NOISE_BLOCK):
        for i in range(draw.replicates):
            r = start + i
            one = draw[i : i + 1]
            grads = _gradients(lambda *t: estimator(*t, one)[0], loss, (q, k, v))
            group = r * groups // replicates
            for name, g, ref in zip(INPUTS, grads, exact):
                d = (torch.zeros_like(ref) if g is None else g.double()) - ref
                sums[name][group] += d
                squares[name][group] += (d * d).sum(-1)
    sizes = {"seq_len": q.shape[-2], "key_len": k.shape[-2], "d": q.shape[-1], "dv": v.shape[-1],
             "batch": math.prod(q.shape[:-2])}
    counts = np.bincount([r * groups // replicates for r in range(replicates)], minlength=groups).astype(float)
    metrics = {}
    for name, ref in zip(INPUTS, exact):
        power = float((ref * ref).sum(-1).mean())
        total_d, total_sq = sums[name].sum(0), squares[name].sum(0)
        full = _summaries(total_d, total_sq, float(replicates), power)
        loo = [_summaries(total_d - sums[name][g], total_sq - squares[name][g], replicates - counts[g], power)
               for g in range(groups)]
        for metric in METRICS:
            metrics[f"grad_{name}_{metric}"] = jackknife_interval(full[metric], np.array([row[metric] for row in loo]))
    return GradientGap(estimator, replicates, seed, sizes, metrics, dict(zip(INPUTS, exact)))
