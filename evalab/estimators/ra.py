"""RA: randomised attention, the quadratic and unbiased sampler of softmax attention (docs/theory.md section 10).

Softmax attention is the expectation of f(omega) = sum_m softmax_m(omega.y_m - |y_m|^2/2) v_m under the
mixture p_n(omega) = sum_m pi_nm N(omega; x_n + y_m, I), pi_n the softmax row of query n. RA samples p_n
exactly: per query n and sample s, a key index m ~ Categorical(pi_n) (inverse CDF of a uniform u_{n,s}) and
omega_{n,s} = x_n + y_m + sigma eps_{n,s}, eps ~ N(0, I); RA_n = (1/S) sum_s f(omega_{n,s}). Causal: pi_n and f
keep the keys m <= n only. Every sample costs a pass over all M keys, so RA is quadratic by design.
With sigma = 1, E[RA_n] = Y_n exactly.

Noise: one tensor holds both sources, the normals in the first d channels and the uniform in the last,
(R, N, S, d + 1) (``shared_noise=False``: (R, *batch, N, S, d + 1)).

The authors' reference code (HKUNLP/efficient-attention, RandomizedAttention) draws one sample per query
(``num_samples`` there is a mode switch, not a count), with its noise in raw coordinates (noise_scale
d ** -0.25 here, hence biased), and in evaluation mode drops the noise but keeps the random key index, whose
mean sum_m pi_nm f(x_n + y_m) is not softmax attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks
from .base import Cost
from .draw import Draw, gaussian_noise, make_generator, noise_batch
from .scaled import Scaled

#: Elements of the per-block sample logits (replicates x batch x queries x samples x keys).
BLOCK_ELEMENTS = 2**21


@dataclass(frozen=True)
class RA:
    """Randomised attention with S = ``samples_per_query`` exact samples of p_n per query.

    noise_scale: sigma, the standard deviation of eps in scaled coordinates. sigma = 1 samples p_n exactly and
    RA is unbiased; any other sigma samples a different density and RA is biased (the authors' reference code
    draws its noise in raw coordinates: sigma = d ** -0.25 in scaled ones).
    shared_noise: one draw for every batch element (True) or one per element (False).
    Call: est(q, k, v, draw) -> (R, *b, N, dv); draw noise (R, N, S, d + 1), last channel the uniform.
    """

    samples_per_query: int = 16
    noise_scale: float = 1.0
    causal: bool = False
    shared_noise: bool = True
    scale: float | None = None
    budget = "samples_per_query"  # the parameter along which the error falls (evalab.testing)

    def __post_init__(self) -> None:
        _checks.integer("samples_per_query", self.samples_per_query)
        _checks.real("noise_scale", self.noise_scale)
        _checks.real("scale", self.scale, allow_none=True, strict=True)

    @property
    def noise_kind(self) -> str:
        return "ra:uniform+normal"

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        """Shape of one replicate's noise: (N, S, d + 1), with the batch axes of q first when not shared."""
        _checks.tensor("q", q)
        batch = noise_batch(q, self.shared_noise)
        return (*batch, q.shape[-2], self.samples_per_query, q.shape[-1] + 1)

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """Sample eps ~ N(0, I) and u ~ U[0, 1): Draw with noise (R, *layout), float64 on the generator's device."""
        _checks.integer("replicates", replicates)
        g = make_generator(generator)
        *lead, channels = self.noise_layout(q, k)
        eps = gaussian_noise(replicates, *lead, channels - 1, generator=g)
        u = torch.rand(replicates, *lead, 1, generator=g, device=g.device, dtype=torch.float64)
        return Draw(torch.cat([eps, u], dim=-1), self.noise_kind)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        noise = draw.for_estimator(self, q, k, inp.x)
        batch, (N, M), S = inp.x.shape[:-2], (q.shape[-2], k.shape[-2]), self.samples_per_query
        R = noise.shape[0]
        if self.shared_noise:
            noise = noise.reshape(R, *(1,) * len(batch), *noise.shape[1:])
        half_y = 0.5 * (inp.y * inp.y).sum(-1)  # (*b, M)
        out = torch.empty(R, *batch, N, v.shape[-1], dtype=inp.x.dtype, device=inp.x.device)
        rows = max(1, BLOCK_ELEMENTS // (R * math.prod(batch) * S * M))
        for start in range(0, N, rows):  # blocks of queries bound the (R, *b, rows, S, M) sample logits
            stop = min(N, start + rows)
            x, block = inp.x[..., start:stop, :], noise[..., start:stop, :, :]
            ahead = (torch.arange(M, device=x.device) > torch.arange(start, stop, device=x.device).unsqueeze(-1)
                     if self.causal else None)  # (rows, M): keys after the query
            index = _sample_keys(x @ inp.y.transpose(-1, -2), block[..., -1], ahead)  # (R, *b, rows, S)
            chosen = torch.take_along_dim(inp.y.unsqueeze(0), index.flatten(-2).unsqueeze(-1), dim=-2)
            omega = x.unsqueeze(-2) + chosen.unflatten(-2, (stop - start, S))
            omega.add_(block[..., :-1], alpha=self.noise_scale)
            logits = (omega.flatten(-3, -2) @ inp.y.transpose(-1, -2)).sub_(half_y.unsqueeze(-2))  # (R, *b, rows S, M)
            logits = logits.unflatten(-2, (stop - start, S))
            if ahead is not None:
                logits.masked_fill_(ahead.unsqueeze(-2), -math.inf)
            f = torch.softmax(logits, dim=-1).flatten(-3, -2) @ inp.v  # (R, *b, rows S, dv)
            out[..., start:stop, :] = f.unflatten(-2, (stop - start, S)).mean(-2)
        return out.to(inp.out_dtype)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Counted as the code runs it (causal masks the full rows, so it costs the same).

        Matrix products: the logits for pi (2 N M d, deterministic), and per replicate the sample logits
        omega.y_m (2 N S M d) and their softmax times v (2 N S M dv). Elementwise, added on top: pi's
        subtract-max, exp and cumulative sum (3 N M), the samples omega (2 N S d), the half norms and softmax of
        the sample logits (5 N S M) and the mean over samples (N S dv).
        Memory: the sample logits and softmax of one block of queries, which holds at most BLOCK_ELEMENTS
        logits over all batch elements and replicates (or one query row), and per replicate the noise and the
        output.
        """
        S = self.samples_per_query
        fixed = 2 * N * M * d + 3 * N * M
        rep = 2 * N * S * M * (d + dv) + 2 * N * S * d + 5 * N * S * M + N * S * dv
        block = 2 * min(BLOCK_ELEMENTS, batch * N * S * M)  # the whole block budget, shared by the batch
        memory = batch * (N * S * (d + 1) + N * dv + 2 * S * M)  # with at least one query row per block
        return Cost(batch * fixed, batch * rep, itemsize * block, itemsize * memory)


def _sample_keys(logits: torch.Tensor, u: torch.Tensor, ahead: torch.Tensor | None) -> torch.Tensor:
    """Key indices m ~ Categorical(softmax(logits)) by inverse CDF: the first m whose cumulative mass exceeds u
    times the total. logits (*b, rows, M), u (R, *b', rows, S) -> (R, *b, rows, S) int64.

    Only keys of positive mass are ever chosen: a u that rounds up to the total (float32) falls back to the
    last key of positive mass instead of running past it.
    """
    if ahead is not None:
        logits = logits.masked_fill(ahead, -math.inf)
    mass = (logits - logits.amax(-1, keepdim=True)).exp_()
    cdf = mass.cumsum(-1)
    keys = torch.arange(cdf.shape[-1], device=cdf.device)
    last = ((mass > 0) * keys).amax(-1, keepdim=True)  # (*b, rows, 1)
    shape = torch.broadcast_shapes(u.shape[:-1], cdf.shape[:-1])
    cdf = cdf.expand(*shape, cdf.shape[-1]).contiguous()
    index = torch.searchsorted(cdf, u.expand(*shape, u.shape[-1]) * cdf[..., -1:], right=True)
    return torch.minimum(index, last)
