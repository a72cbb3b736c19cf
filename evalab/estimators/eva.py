"""EVA: an exact local window plus one control-variate coefficient per chunk of keys (theory.md section 5).

For query n the output is one softmax over [l_nm for m in the window E_n ; one logit per visible chunk]
applied to [v_m ; beta_{n,c}], where beta_{n,c} is the chunk's self-normalised importance-sampling estimate of
its own softmax average, from S_c draws w_{c,s} = mu_c + eps_{c,s}. Window logits, chunk logits and the
visibility mask are deterministic and computed once per call, the chunk logits over blocks of queries so that
no N x C tensor is ever held; only the chunk values beta depend on the draw.
Cost O(N (w + C S_c) d) per replicate; chunk_logit="exact" adds the quadratic oracle (once per call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks
from .base import Cost
from .draw import Draw, gaussian_noise, make_generator
from .scaled import Scaled
from .softmax import BLOCK_ELEMENTS

PROPOSALS = ("zero", "mean", "half-mean")
CHUNK_LOGITS = ("exact", "mean", "official")
PARTITIONS = ("disjoint", "official")
#: Elements of the per-block chunk logits (queries x chunks, times replicates x samples when S_c > 1).
QUERY_BLOCK_ELEMENTS = 2**20


@dataclass(frozen=True)
class EVA:
    """EVA with a block-local ``window`` (0: none) and chunks of ``chunk_size`` keys (0: none, window only).

    proposal: zero | mean | half-mean (mean of the chunk's x plus mean of its y, or half of it).
    chunk_logit: exact | mean | official. partition: disjoint (paper) | official (reference code).
    Call: est(q, k, v, draw) -> (R, *b, N, dv); draw noise (R, C, S_c, d).
    """

    window: int = 32
    chunk_size: int = 8
    samples_per_chunk: int = 1
    proposal: str = "mean"
    chunk_logit: str = "mean"
    partition: str = "disjoint"
    causal: bool = False
    scale: float | None = None

    def __post_init__(self) -> None:
        _checks.integer("window", self.window, minimum=0)
        _checks.integer("chunk_size", self.chunk_size, minimum=0)
        _checks.integer("samples_per_chunk", self.samples_per_chunk)
        _checks.choice("proposal", self.proposal, PROPOSALS)
        _checks.choice("chunk_logit", self.chunk_logit, CHUNK_LOGITS)
        _checks.choice("partition", self.partition, PARTITIONS)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        if self.window == 0 and self.chunk_size == 0:
            raise ValueError("window=0 and chunk_size=0 leave nothing to attend; set at least one of them > 0")
        if self.window > 0 and self.chunk_size > 0 and self.window % self.chunk_size:
            raise ValueError(f"window={self.window} must be a multiple of chunk_size={self.chunk_size}")
        if self.causal and self.window == 0 and (self.partition == "official" or self.chunk_size > 1):
            raise ValueError(
                f"causal EVA with window=0 needs partition='disjoint' and chunk_size=1, got partition="
                f"{self.partition!r}, chunk_size={self.chunk_size}: early queries would see no complete chunk"
            )

    @property
    def noise_kind(self) -> str:
        return "eps"

    def num_chunks(self, k: torch.Tensor) -> int:
        """C = ceil(M / chunk_size), 0 without chunks."""
        return math.ceil(k.shape[-2] / self.chunk_size) if self.chunk_size else 0

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        """Shape of one replicate's noise: eps (C, S_c, d)."""
        return (self.num_chunks(k), self.samples_per_chunk, q.shape[-1])

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """Sample eps ~ N(0, I): Draw with noise (R, C, S_c, d), float64 on the generator's device."""
        _checks.integer("replicates", replicates)
        g = make_generator(generator)
        noise = gaussian_noise(replicates, *self.noise_layout(q, k), generator=g)
        return Draw(noise, self.noise_kind)

    def _check_lengths(self, N: int, M: int) -> None:
        if N == M:
            return
        if self.window > 0:
            raise ValueError(f"window={self.window} needs self-attention (N == M), got N={N}, M={M}")
        if self.chunk_size > 0 and self.proposal != "zero":
            raise ValueError(f"proposal={self.proposal!r} uses the chunk's queries and needs N == M, got N={N}, M={M}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        self._check_lengths(q.shape[-2], k.shape[-2])
        eps = draw.as_tensor(self.noise_layout(q, k), self.noise_kind, device=inp.x.device, dtype=inp.x.dtype)
        R, (N, dv) = eps.shape[0], (q.shape[-2], v.shape[-1])

        window = _Window(inp, self.window, self.causal) if self.window else None
        if not self.chunk_size:
            return window.output(window.lse).expand(R, *inp.x.shape[:-1], dv).to(inp.out_dtype)

        chunks = _Chunks(inp, self.chunk_size)
        chunk_logits = self._chunk_logits(inp, chunks)
        values = _ChunkValues(inp, chunks, self._proposal_mean(inp, chunks), eps)
        out = torch.empty(R, *inp.x.shape[:-1], dv, dtype=inp.x.dtype, device=inp.x.device)
        lse = torch.empty(inp.x.shape[:-1], dtype=inp.x.dtype, device=inp.x.device)
        # visibility depends on n // chunk_size only (window is a multiple of it): one mask row per group of queries
        group = self.chunk_size
        hidden = ~self._visible(torch.arange(0, N, group, device=inp.x.device), chunks)  # (ceil(N / group), C)
        hidden = hidden if bool(hidden.any()) else None  # None: every query sees every chunk
        per_row = math.prod(inp.x.shape[:-2]) * chunks.count * (R * eps.shape[-2] if eps.shape[-2] > 1 else 1)
        rows = max(1, QUERY_BLOCK_ELEMENTS // per_row // group) * group
        for start in range(0, N, rows):  # blocks of queries keep the (rows, C) logits in cache
            stop = min(N, start + rows)
            logits = chunk_logits(inp.x[..., start:stop, :])  # (*b, rows, C)
            if hidden is not None:
                block = hidden[start // group : -(-stop // group)].repeat_interleave(group, dim=0)[: stop - start]
                logits.masked_fill_(block, -math.inf)
            block_lse = torch.logsumexp(logits, dim=-1)
            if window is not None:
                block_lse = torch.logaddexp(block_lse, window.lse[..., start:stop])
            weights = logits.sub_(block_lse.unsqueeze(-1)).exp_()  # deterministic
            out[..., start:stop, :] = values.output(inp.x[..., start:stop, :], weights)
            lse[..., start:stop] = block_lse
        if window is not None:
            out += window.output(lse)
        return out.to(inp.out_dtype)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Deterministic per call: the window (N w (2d + 2dv + 4)) and the chunk logits (2 N C d, or the
        quadratic oracle for chunk_logit="exact"); per replicate: log xi per chunk, its softmax and chunk
        averages, and the mix over chunks (with S_c > 1 the query-dependent importance weights)."""
        w = min(self.window, N)
        fixed = memory_fixed = 0.0
        if w:
            fixed += N * w * (2 * d + 2 * dv + 4)
            memory_fixed += 2 * N * w + N * dv
        if not self.chunk_size:
            return Cost.per_element(fixed, 0.0, memory_fixed, 0.0, batch=batch, itemsize=itemsize)
        C, S = math.ceil(M / self.chunk_size), self.samples_per_chunk
        fixed += (2 * N * M * d + 2 * N * M) if self.chunk_logit == "exact" else 2 * N * C * d + 2 * M * d
        rep = 2 * M * S * d + 4 * M * S + 2 * M * S * dv
        memory = 3 * M * S + C * S * dv + N * dv
        rows = min(N, self.chunk_size)  # the fewest queries per block; blocks hold about QUERY_BLOCK_ELEMENTS
        if S == 1:
            rep += 2 * N * C * dv
            memory_fixed += 3 * C * max(rows, min(N, QUERY_BLOCK_ELEMENTS // C)) + N
        else:
            rep += 2 * N * C * S * (d + dv) + 4 * N * C * S
            memory_fixed += 3 * QUERY_BLOCK_ELEMENTS + N
            memory += 3 * rows * C * S
        return Cost.per_element(fixed, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)

    def _visible(self, n: torch.Tensor, chunks: "_Chunks") -> torch.Tensor:
        """(len(n), C) bool: which chunk terms the queries at positions ``n`` use (a function of n // chunk_size)."""
        device = chunks.sizes.device
        n = n.unsqueeze(-1)
        c = torch.arange(chunks.count, device=device)
        if self.partition == "official":
            return (c < n // self.chunk_size) if self.causal else torch.ones(n.shape[0], chunks.count, dtype=torch.bool, device=device)
        if self.causal:  # chunks ending before the window block starts (no window: chunks ending at or before n)
            window_start = (n // self.window) * self.window if self.window else n + 1
            return chunks.ends <= window_start
        if not self.window:
            return torch.ones(n.shape[0], chunks.count, dtype=torch.bool, device=device)
        return (c * chunks.length) // self.window != n // self.window  # chunks outside the window block

    def _chunk_logits(self, inp: Scaled, chunks: "_Chunks"):
        """A function of a block of queries x (*b, rows, d) giving the stand-ins for log sum_{P_c} exp(l_nm),
        (*b, rows, C); the key-side work is done here, once."""
        if self.chunk_logit == "exact":
            y_c = chunks.split(inp.y)
            return lambda x: _chunk_log_mass(x, y_c, chunks)
        means = chunks.mean(inp.y).transpose(-1, -2)  # (*b, d, C)
        if self.chunk_logit == "mean":
            log_sizes = chunks.sizes.log()
            return lambda x: (x @ means).add_(log_sizes)
        return lambda x: x @ means

    def _proposal_mean(self, inp: Scaled, chunks: "_Chunks") -> torch.Tensor:
        """mu_c (*b, C, d)."""
        if self.proposal == "zero":
            return torch.zeros(*inp.y.shape[:-2], chunks.count, inp.y.shape[-1], dtype=inp.y.dtype, device=inp.y.device)
        mu = chunks.mean(inp.x) + chunks.mean(inp.y)
        return 0.5 * mu if self.proposal == "half-mean" else mu


class _ChunkValues:
    """The draw-dependent chunk values beta_{n,c}: per-chunk SNIS averages computed once, mixed per query block."""

    def __init__(self, inp: Scaled, chunks: "_Chunks", mu: torch.Tensor, eps: torch.Tensor):
        R, C, S, d = eps.shape
        w = mu.unsqueeze(-2) + eps.reshape(R, *([1] * (mu.dim() - 2)), C, S, d)  # (R, *b, C, S, d)
        y, vals = chunks.split(inp.y), chunks.split(inp.v)  # (*b, C, L, d), (*b, C, L, dv)
        # padded keys get -inf through their half norm; one batched GEMM per chunk over all replicates and samples
        half = (0.5 * (y * y).sum(-1)).masked_fill(~chunks.valid, math.inf)  # (*b, C, L)
        log_xi = torch.einsum("...cld,r...csd->r...cls", y, w) - half.unsqueeze(-1)  # (R, *b, C, L, S)
        averages = torch.einsum("r...cls,...clv->r...scv", torch.softmax(log_xi, dim=-2), vals)  # (R, *b, S, C, dv)
        self.samples, self.count = S, C
        self.averages = averages.flatten(-3, -2)  # (R, *b, S C, dv), sample-major so softmaxes over s run along C
        if S > 1:  # a_s ∝ exp(w.x_n - w.mu_c + |mu_c|^2/2): log a_s + log K_cs = w.x_n + offset
            log_mass = torch.logsumexp(log_xi, dim=-2)  # (R, *b, C, S)
            offset = log_mass - (w * mu.unsqueeze(-2)).sum(-1) + 0.5 * (mu * mu).sum(-1, keepdim=True)
            self.offset = offset.transpose(-1, -2)  # (R, *b, S, C)
            self.w = w.transpose(-3, -2).flatten(-3, -2)  # (R, *b, S C, d)

    def output(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_c weights_nc beta_{n,c} for queries x (*b, rows, d) with chunk weights (*b, rows, C): (R, *b, rows, dv)."""
        if self.samples == 1:  # the importance weights cancel: beta_c does not depend on the query
            return torch.einsum("...nc,r...cv->r...nv", weights, self.averages)
        logits = torch.einsum("...nd,r...jd->r...nj", x, self.w).unflatten(-1, (self.samples, self.count))
        mix = torch.softmax(logits + self.offset.unsqueeze(-3), dim=-2) * weights.unsqueeze(-2)  # (R, *b, rows, S, C)
        return mix.flatten(-2) @ self.averages


class _Chunks:
    """Contiguous chunks of ``chunk_size`` keys over M positions (the last one may be shorter)."""

    def __init__(self, inp: Scaled, chunk_size: int):
        M, device = inp.y.shape[-2], inp.y.device
        self.length = min(chunk_size, M)
        self.count = math.ceil(M / self.length)
        position = torch.arange(self.count * self.length, device=device).view(self.count, self.length)
        self.valid = position < M  # (C, L)
        self.sizes = self.valid.sum(-1).to(inp.y.dtype)  # (C,)
        self.ends = torch.clamp((torch.arange(self.count, device=device) + 1) * self.length, max=M)  # exclusive
        self._pad = self.count * self.length - M

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """(*b, M, e) -> (*b, C, L, e), zero-padded."""
        return torch.nn.functional.pad(t, (0, 0, 0, self._pad)).unflatten(-2, (self.count, self.length))

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Per-chunk mean over real positions: (*b, M, e) -> (*b, C, e)."""
        return self.split(t).sum(-2) / self.sizes.unsqueeze(-1)


class _Window:
    """Exact block-local attention: position n sees the block of ``window`` positions holding it (causal: m <= n)."""

    def __init__(self, inp: Scaled, window: int, causal: bool):
        self.N, self.blocks = inp.x.shape[-2], _Chunks(inp, window)  # blocks of positions, laid out as chunks (N == M)
        L = self.blocks.length
        self.v = self.blocks.split(inp.v)  # (*b, B, L, dv)
        logits = self.blocks.split(inp.x) @ self.blocks.split(inp.y).transpose(-1, -2)  # (*b, B, L, L)
        hidden = ~self.blocks.valid.unsqueeze(-2)  # padding keys (B, 1, L)
        if causal:
            hidden = hidden | torch.ones(L, L, dtype=torch.bool, device=inp.x.device).triu(1)
        self.logits = logits.masked_fill(hidden, -math.inf)
        self.lse = torch.logsumexp(self.logits, dim=-1).flatten(-2)[..., : self.N]  # (*b, N)

    def output(self, lse: torch.Tensor) -> torch.Tensor:
        """sum_{m in E_n} exp(l_nm - lse_n) v_m for a total log-normaliser lse (*b, N): (*b, N, dv)."""
        lse = self.blocks.split(lse.unsqueeze(-1))  # (*b, B, L, 1)
        weights = (self.logits - lse).exp()
        return (weights @ self.v).flatten(-3, -2)[..., : self.N, :]


def _chunk_log_mass(x: torch.Tensor, y_c: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    """Exact log sum_{m in P_c} exp(x_n.y_m) for chunked keys y_c (*b, C, L, d): (*b, N, C), over blocks of
    queries (the quadratic oracle)."""
    N = x.shape[-2]
    block = max(1, min(N, BLOCK_ELEMENTS // max(1, math.prod(x.shape[:-2]) * chunks.count * chunks.length)))
    out = torch.empty(*x.shape[:-1], chunks.count, dtype=x.dtype, device=x.device)
    for start in range(0, N, block):
        logits = torch.einsum("...nd,...cld->...ncl", x[..., start : start + block, :], y_c)
        out[..., start : start + block, :] = torch.logsumexp(logits.masked_fill(~chunks.valid, -math.inf), dim=-1)
    return out
