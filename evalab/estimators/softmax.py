"""Exact softmax attention, the reference every estimator is measured against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from .base import Cost
from .draw import Draw, NoDraws

#: Logit elements per query block where logits are materialised (float32: 8 MiB, cache-friendly).
BLOCK_ELEMENTS = 2**21
#: Query rows x keys per fused-attention call: bounds memory even where torch falls back to its unfused path.
ATTENTION_BLOCK_ELEMENTS = 2**24


def softmax_bytes(*, N: int, M: int, dv: int, batch: int = 1, itemsize: int = 4,
                  block_elements: int = ATTENTION_BLOCK_ELEMENTS, holds_logits: bool = True) -> int:
    """Peak bytes of softmax_attention beside its inputs: the (batch, N, dv) output and one block of query rows'
    logits (at least one row of M per batch element), as torch's unfused path holds them; ``holds_logits=False``
    for the GPU kernels that hold none."""
    rows = max(1, min(N, block_elements // max(1, batch * M)))
    return batch * (N * dv + (rows * M if holds_logits else 0)) * itemsize


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_elements: int = ATTENTION_BLOCK_ELEMENTS,
    max_memory: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Exact softmax attention: torch's fused scaled_dot_product_attention over blocks of queries, so at most
    ``block_elements`` logits exist at once whichever kernel torch picks (on a GPU, float32 and below run in one
    call: those kernels hold no logits).

    q (*batch, N, d), k (*batch, M, d), v (*batch, M, dv) -> (*batch, N, dv) in the inputs' dtype
    (float16/bfloat16 are computed in float32). ``scale`` defaults to d**-0.5; ``causal`` keeps keys m <= n.
    The output, input casts and one block of logits must fit in ``max_memory`` bytes (default 2 GiB), else a
    MemoryError says so before anything is allocated. ``progress`` shows a bar over the query blocks, with an ETA.
    """
    _checks.qkv(q, k, v, causal=causal)
    _checks.integer("block_elements", block_elements)
    _checks.boolean("progress", progress)
    ct = _checks.compute_dtype(q, k, v)
    s = _checks.resolve_scale(scale, q.shape[-1])
    batch, (N, M), dv = math.prod(q.shape[:-2]), (q.shape[-2], k.shape[-2]), v.shape[-1]
    # torch's GPU kernels for float32 and below never hold the logits and need every query for occupancy
    fused_on_device = q.device.type != "cpu" and ct != torch.float64
    itemsize = torch.finfo(ct).bits // 8
    casts = sum(t.numel() for t in (q, k, v) if t.dtype != ct) * itemsize
    needed = casts + softmax_bytes(N=N, M=M, dv=dv, batch=batch, itemsize=itemsize, block_elements=block_elements,
                                   holds_logits=not fused_on_device)
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    _checks.memory(f"softmax_attention on batch x N x M x dv = {batch} x {N} x {M} x {dv}", needed,
                   _checks.real("max_memory", max_memory, strict=True),
                   "pass fewer queries (N), keys (M) or batch elements, a smaller block_elements, or raise max_memory")
    # (batch, 1, length, features): the fused CPU kernel needs 4-D inputs (3-D ones materialise N x M)
    x, y, vals = (t.to(ct).reshape(batch, 1, *t.shape[-2:]) for t in (q, k, v))
    block = N if fused_on_device else max(1, min(N, block_elements // max(1, batch * M)))
    out = torch.empty(batch, 1, N, dv, dtype=ct, device=q.device)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=N, desc="exact softmax attention", unit="query")
    for start in range(0, N, block):
        stop = min(N, start + block)
        keys = stop if causal else M  # causal queries in [start, stop) see keys [0, stop)
        mask = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).tril_(start) if causal and start else None
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            x[:, :, start:stop], y[:, :, :keys], vals[:, :, :keys], attn_mask=mask, is_causal=causal and not start, scale=s
        )
        if progress:
            bar.update(stop - start)
    if progress:
        bar.close()
    return out.reshape(*q.shape[:-1], dv).to(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


@dataclass(frozen=True)
class Softmax(NoDraws):
    """Exact softmax attention as an estimator (no randomness), so sweeps and costs treat it like the others."""

    causal: bool = False
    scale: float | None = None

    def exact_limit(self, N: int, M: int):
        """Exact already: itself (evalab.testing)."""
        return self


    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        out = softmax_attention(q, k, v, scale=self.scale, causal=self.causal)
        draw.for_estimator(self, q, k, q)  # refuses another estimator's draw
        return out.expand(draw.replicates, *out.shape)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Logits, weights @ v and max/sub/exp/sum over the N x M pairs (half of them when causal), all
        deterministic; memory: one block of logits at most (the fused kernel holds far less) and the output."""
        pairs = N * (M + 1) / 2 if self.causal else N * M
        flops = pairs * (2 * d + 2 * dv + 4)
        block = min(N, max(1, ATTENTION_BLOCK_ELEMENTS // M)) * M
        return Cost.per_element(flops, 0.0, block + N * dv, 0.0, batch=batch, itemsize=itemsize)
