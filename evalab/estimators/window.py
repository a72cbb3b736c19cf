"""Local windows: which keys a query attends to exactly, and exact softmax restricted to them (docs/theory.md,
sections "Scatterbrain" and "Feature maps and window hybrids").

A window of ``w`` positions gives query n the interval of keys [lo_n, hi_n):

- ``"block"``: EVA's block partition, the block of w positions holding n: [floor(n / w) w, floor(n / w) w + w);
- ``"sliding"``: the w keys centred on n, m - n in [-floor(w/2), ceil(w/2)) (the Scatterbrain authors'
  SBLocalAttention); causal, the w keys ending at n, m in (n - w, n] (the sliding windows of LoLCATs and Based);

causal windows keep keys m <= n only. w = 0 is the empty window, placed where the causal prefix ends
(lo_n = hi_n = n + 1), so that the keys outside it are the prefix [0, lo_n) and the suffix [hi_n, M). Both
bounds are non-decreasing in n. Scatterbrain, LocalWindow and the window hybrids all take their windows from
:func:`bounds`.

Exact attention on the windows (:func:`local_attention`) runs over blocks of queries, each taking the span of
keys its windows reach (the window itself for the block kind, T - 1 + w for the sliding one) as a strided view
of the zero-padded keys (:func:`window_blocks`), so neither an N x M tensor nor a gathered copy is formed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import _checks
from .base import Cost
from .draw import Draw, NoDraws
from .scaled import Scaled

KINDS = ("block", "sliding")
#: Queries per block of windowed attention (and keys per tile of Scatterbrain's states); the block kind uses its
#: window blocks instead when they are 8 to 128 positions long (then no padded pairs are formed at all).
QUERY_BLOCK = 32


def bounds(window: int, kind: str, N: int, M: int, *, causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The window of every query, keys [lo_n, hi_n): (N,) each, non-decreasing in n. A window > 0 needs
    self-attention (N == M)."""
    n = np.arange(N)
    if window == 0:  # empty, placed where the causal prefix ends
        lo = np.minimum(n + 1, M)
        return lo, lo
    if N != M:
        raise ValueError(f"window={window} needs self-attention (N == M), got N={N}, M={M}")
    if kind == "block":
        lo = (n // window) * window
        hi = np.minimum(lo + window, M)
    elif causal:
        lo, hi = np.maximum(n - window + 1, 0), n + 1
    else:
        lo, hi = np.maximum(n - window // 2, 0), np.minimum(n + (window + 1) // 2, M)
    return lo, (np.minimum(hi, n + 1) if causal else hi)


def query_block(window: int, kind: str) -> int:
    """Queries per block of windowed attention: the window for a block kind of 8 to 128 positions (each block's
    bounds are then constant), QUERY_BLOCK otherwise."""
    return window if kind == "block" and 8 <= window <= 128 else QUERY_BLOCK


def span(lo: np.ndarray, hi: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """The keys each block of ``block`` queries gathers for its windows: (first key per block (B,), span), so
    that block j holds keys [first_j, first_j + span) ⊇ every [lo_n, hi_n) of its queries. The blocks start
    ``block`` keys apart (first_j = j block + c, possibly before the first key), so they are strided views of
    the keys."""
    N = len(lo)
    starts = np.arange(0, N, block)
    first = starts + int((lo[::block] - starts).min(initial=0))
    last = hi[np.minimum(starts + block, N) - 1]
    return first, int((last - first).max(initial=0))


def pairs(lo: np.ndarray, hi: np.ndarray, block: int) -> int:
    """Query-key pairs :func:`local_attention` forms (padded blocks included): blocks x block x span."""
    first, width = span(lo, hi, block)
    return len(first) * block * width


def local_attention(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, lo: np.ndarray, hi: np.ndarray,
                    block: int, *, with_max: bool = False) -> tuple[torch.Tensor, ...]:
    """Exact attention of scaled queries x (*b, N, d) on keys y (*b, M, d), values v (*b, M, dv) restricted to
    [lo_n, hi_n): (log sum_m e^{x_n.y_m} (*b, N), sum_m e^{x_n.y_m - lse_n} v_m (*b, N, dv)); -inf and 0 for an
    empty window; ``with_max`` adds the largest logit in the window (*b, N) (-inf when empty). Over blocks of
    ``block`` queries (memory N x span); differentiable (no in-place operation on anything autograd keeps)."""
    N, M, device = x.shape[-2], y.shape[-2], x.device
    first, width = span(lo, hi, block)
    if width == 0:
        empty = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=device)
        zeros = torch.zeros(*x.shape[:-1], v.shape[-1], dtype=v.dtype, device=device)
        return (empty, zeros, empty) if with_max else (empty, zeros)
    xb, keys, values, inside = window_blocks(x, y, v, lo, hi, block)
    logits = xb @ keys.transpose(-1, -2)  # (*b, B, block, span)
    if inside is None:  # no key masked, no empty window: one shift per row, no -inf
        top = logits.amax(-1, keepdim=True)
        weights = (logits - top).exp()
        total = weights.sum(-1, keepdim=True)
        lse, weights = (top + total.log()).squeeze(-1), weights / total
    else:
        logits = logits.masked_fill(~inside, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - finite(lse).unsqueeze(-1))
    out = weights @ values  # (*b, B, block, dv)
    lse, out = lse.flatten(-2)[..., :N], out.flatten(-3, -2)[..., :N, :]
    return (lse, out, logits.amax(-1).flatten(-2)[..., :N]) if with_max else (lse, out)


def window_blocks(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, lo: np.ndarray, hi: np.ndarray,
                  block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The windows [lo_n, hi_n) of blocks of ``block`` queries: xb (*b, B, block, d), the queries zero-padded to
    B blocks; keys (*b, B, span, d) and values (*b, B, span, dv), the keys each block gathers (views: of the
    keys themselves when the blocks tile them, else of the keys zero-padded on both sides); inside
    (B, block, span) bool, which of them lie in each query's window (padding rows: the last query's), or None
    when all do."""
    N, M, device = x.shape[-2], y.shape[-2], x.device
    first, width = span(lo, hi, block)
    B, pad = len(first), len(first) * block - N
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (B, block))  # (*b, B, block, d)
    if _tiles(first, width, block, M) and not pad:  # block j holds keys [j T, j T + T)
        keys, values = y.unflatten(-2, (B, block)), v.unflatten(-2, (B, block))
        if (lo == np.repeat(first, block)).all() and (hi == np.repeat(first + width, block)).all():
            return xb, keys, values, None  # each query all of them
    else:  # keys [first_j, first_j + span) of the keys zero-padded on both sides, block keys apart: a strided view
        left = max(0, -int(first[0]))
        right = max(0, int(first[-1]) + width - M)
        base = int(first[0]) + left
        keys, values = (torch.nn.functional.pad(t, (0, 0, left, right))[..., base:, :]
                        .unfold(-2, width, block)[..., :B, :, :].transpose(-1, -2) for t in (y, v))  # (*b, B, span, .)
    key = torch.from_numpy(first).to(device).unsqueeze(-1) + torch.arange(width, device=device)  # (B, span)
    lo_t, hi_t = (torch.from_numpy(np.pad(t, (0, pad), mode="edge")).to(device).view(B, block, 1) for t in (lo, hi))
    return xb, keys, values, (key.unsqueeze(-2) >= lo_t) & (key.unsqueeze(-2) < hi_t)


def _tiles(first: np.ndarray, width: int, block: int, M: int) -> bool:
    """Whether blocks of ``block`` queries gathering ``width`` keys from ``first`` (B,) on are the tiles
    [j block, j block + block) of all M keys (then the keys are a view, no gathered copy)."""
    return width == block and len(first) * block == M and (first == np.arange(len(first)) * block).all()


def finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (an empty set) replaced by 0, so that e^{-inf - lse} gives weight 0, not nan."""
    return lse.masked_fill(lse == -math.inf, 0.0)


def check_window(window: int, kind: str, *, minimum: int = 0, kind_name: str = "kind") -> None:
    """ValueError naming ``window`` or the kind (as ``kind_name``) when they are not a window size >= minimum and
    one of KINDS."""
    _checks.integer("window", window, minimum=minimum)
    _checks.choice(kind_name, kind, KINDS)


@dataclass(frozen=True)
class LocalWindow(NoDraws):
    """Exact softmax restricted to a local ``window`` of ``kind`` block | sliding (module docstring), every key
    outside it dropped: the window-only baseline; deterministic. A window covering every key is softmax.

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0). Needs
    self-attention (N == M).
    """

    window: int = 64
    kind: str = "block"
    causal: bool = False
    scale: float | None = None

    def exact_limit(self, N: int, M: int):
        """Exact for N = M: a window holding every key (evalab.testing)."""
        return replace(self, window=2 * M) if N == M else None

    def __post_init__(self) -> None:
        check_window(self.window, self.kind, minimum=1)
        _checks.boolean("causal", self.causal)
        _checks.real("scale", self.scale, allow_none=True, strict=True)

    @classmethod
    def _check_instances(cls) -> list:
        return [cls(window=w, kind=kind, causal=causal) for kind, w in (("block", 8), ("sliding", 7))
                for causal in (False, True)]

    def bounds(self, N: int, M: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys [lo_n, hi_n) of every query: (N,) each."""
        return bounds(self.window, self.kind, N, M, causal=self.causal)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        draw.for_estimator(self, q, k, inp.x)  # refuses another estimator's draw
        lo, hi = self.bounds(q.shape[-2], k.shape[-2])
        out = local_attention(inp.x, inp.y, inp.v, lo, hi, query_block(self.window, self.kind))[1]
        return out.to(inp.out_dtype).expand(draw.replicates, *out.shape)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Deterministic: over blocks of T queries, each gathering the span of keys its windows reach, the logits
        and weights @ v, 2 P (d + dv) with P = blocks x T x span pairs, plus 4 elementwise per pair (mask,
        logsumexp, subtract, exp). Memory: the logits, the gathered keys and values, the output."""
        lo, hi = self.bounds(N, M)
        block = query_block(self.window, self.kind)
        first, width = span(lo, hi, block)
        P = len(first) * block * width
        memory = 2 * P + len(first) * width * (d + dv) + N * dv
        return Cost.per_element(2 * P * (d + dv) + 4 * P, 0.0, memory, 0.0, batch=batch, itemsize=itemsize)
