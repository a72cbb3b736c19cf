"""Exact softmax attention, the reference every estimator is measured against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks
from .draw import Draw

#: Logit elements per query block (float32: 8 MiB, cache-friendly); bounds memory whatever N and M are.
BLOCK_ELEMENTS = 2**21


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Exact softmax attention, computed over blocks of queries so the N x M matrix never exists at once.

    q (*batch, N, d), k (*batch, M, d), v (*batch, M, dv) -> (*batch, N, dv) in the inputs' dtype
    (float16/bfloat16 are computed in float32). ``scale`` defaults to d**-0.5; ``causal`` keeps keys m <= n.
    """
    _checks.qkv(q, k, v, causal=causal)
    _checks.integer("block_elements", block_elements)
    ct = _checks.compute_dtype(q, k, v)
    s = _checks.resolve_scale(_checks.real("scale", scale, allow_none=True, strict=True), q.shape[-1])
    x, y, vals = (q.to(ct) * s), k.to(ct), v.to(ct)
    batch = math.prod(q.shape[:-2])
    N, M = q.shape[-2], k.shape[-2]
    block = max(1, min(N, block_elements // max(1, batch * M)))
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=ct, device=q.device)
    for start in range(0, N, block):
        stop = min(N, start + block)
        keys = stop if causal else M  # causal queries in [start, stop) see keys [0, stop)
        logits = x[..., start:stop, :] @ y[..., :keys, :].transpose(-1, -2)
        if causal:
            ahead = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).triu_(start + 1)
            logits.masked_fill_(ahead, -math.inf)
        logits = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        out[..., start:stop, :] = (logits @ vals[..., :keys, :]).div_(logits.sum(-1, keepdim=True))
    return out.to(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


@dataclass(frozen=True)
class Softmax:
    """Exact softmax attention as an estimator (no randomness), so sweeps and costs treat it like the others."""

    causal: bool = False
    scale: float | None = None

    noise_kind = "none"

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        return (0,)

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """An empty draw: (R, 0)."""
        _checks.integer("replicates", replicates)
        return Draw(torch.zeros(replicates, 0, dtype=torch.float64), self.noise_kind)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        out = softmax_attention(q, k, v, scale=self.scale, causal=self.causal)
        return out.expand(draw.replicates, *out.shape)
