"""EVA: an exact local window plus one control-variate coefficient per chunk of keys (docs/theory.md section 5).

For query n the output is one softmax over [l_nm for m in the window E_n ; one logit per visible chunk]
applied to [v_m ; beta_{n,c}], where beta_{n,c} is the chunk's self-normalised importance-sampling estimate of
its own softmax average, from S_c draws w_{c,s} = mu_c + sigma eps_{c,s}. Window logits, the chunk logits
(all but "rf") and the visibility mask are deterministic and computed once per call, the chunk logits over
blocks of queries so that no N x C tensor is ever held; only the chunk values beta (and the "rf" logits)
depend on the draw.
Cost O(N (w + C S_c) d) per replicate; chunk_logit="exact" adds the quadratic oracle (once per call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import _checks
from .base import Cost
from .draw import Draw, GaussianDraws, noise_batch
from .scaled import Scaled
from .softmax import BLOCK_ELEMENTS

PROPOSALS = ("zero", "mean", "half-mean")
CHUNK_LOGITS = ("exact", "mean", "official", "rf")
PARTITIONS = ("disjoint", "official")
#: Elements of the per-block chunk logits (queries x chunks, times replicates x samples when S_c > 1 or "rf").
QUERY_BLOCK_ELEMENTS = 2**20


@dataclass(frozen=True)
class EVA(GaussianDraws):
    """EVA with a block-local ``window`` (0: none) and chunks of ``chunk_size`` keys (0: none, window only).

    proposal: zero | mean | half-mean (mu_c = 0, the mean of the chunk's x plus the mean of its y, or half that).
    noise_scale: sigma, the standard deviation of eps in scaled coordinates: w_{c,s} = mu_c + sigma eps_{c,s}
        is drawn from N(mu_c, sigma^2 I), and with S_c > 1 the importance weights use that proposal,
        a_s = xi(x_n, w_s) N(w_s; 0, I) / N(w_s; mu_c, sigma^2 I). For sigma^2 <= 1/2 (the released d ** -0.25
        once d >= 4) these weights, and the "rf" mass estimate, have infinite variance; with S_c = 1 and a
        deterministic chunk logit the weights cancel and any sigma is safe.
    chunk_logit: the stand-in for log sum_{m in P_c} exp(l_nm): exact (the quadratic oracle) | mean
        (x_n.ybar_c + log|P_c|) | official (x_n.ybar_c) | rf (the random-feature estimate
        log (1/S_c) sum_s a_s sum_{m in P_c} xi(y_m, w_s) from the chunk's own draws, unbiased inside the log).
    partition: disjoint (the paper: the chunk terms cover the keys outside the window block, so the window must
        be a multiple of chunk_size) | official (the released code: every chunk for every query; causal: the
        chunks before the query's own).
    shared_noise: True, one draw shared by every batch element and head, noise (R, C, S_c, d) (Performer's
        convention for its projection); False, every batch element its own, noise (R, *batch, C, S_c, d) with
        batch = q.shape[:-2] (the released code's convention, and any trained multi-head model's).
    Call: est(q, k, v, draw) -> (R, *b, N, dv).

    Padding with partition="official" (non-causal), as the released code pads when N is not a multiple of the
    window: key positions are zero-filled up to a multiple of the window and then of the chunk size (a chunk
    size beyond that length is cut to it); the chunk means (proposal mu_c, logits "mean" and "official")
    average over the full chunk length, padding included, and "mean" counts |P_c| as that length; a chunk made
    only of padding is kept, with logit 0 ("official"), beta 0 and no mask; beta and the "exact" and "rf"
    logits use the real keys only (an all-padding chunk has logit -inf there). The causal official partition
    and the disjoint one never pad (a causal query sees only complete past chunks).

    The released modules (HKUNLP/efficient-attention, learned maps set to the identity) are these
    configurations (docs/theory.md section 5):

    ========================  =========  ===========  =========  ===========  ======
    released module           partition  chunk_logit  proposal   noise_scale  causal
    ========================  =========  ===========  =========  ===========  ======
    ``EVA``                   official   official     half-mean  d ** -0.25   False
    ``CausalEVAttention``     official   official     mean       d ** -0.25   True
    ========================  =========  ===========  =========  ===========  ======

    with shared_noise=False (the released code draws per batch, head and chunk) and S_c = 1; its eval mode
    (eps = 0) is a Draw of zeros. The released code passes the chunk means through learned maps (Linear plus
    LayerNorm) before forming mu_c and the chunk logit: with them mu_c and the logit become learned functions of
    the chunk means (the logit map can absorb log|P_c|), so only the identity maps are parameter-free and
    reproducible here; the input and output projections act outside attention and change nothing in it.
    """

    window: int = 32
    chunk_size: int = 8
    samples_per_chunk: int = 1
    proposal: str = "mean"
    chunk_logit: str = "mean"
    partition: str = "disjoint"
    causal: bool = False
    scale: float | None = None
    noise_scale: float = 1.0
    shared_noise: bool = True

    def exact_limit(self, N: int, M: int):
        """Exact for N = M: a window covering every key (evalab.testing)."""
        if N != M:
            return None
        return replace(self, window=-(-M // self.chunk_size) * self.chunk_size if self.chunk_size else M)

    def __post_init__(self) -> None:
        _checks.integer("window", self.window, minimum=0)
        _checks.integer("chunk_size", self.chunk_size, minimum=0)
        _checks.integer("samples_per_chunk", self.samples_per_chunk)
        _checks.choice("proposal", self.proposal, PROPOSALS)
        _checks.choice("chunk_logit", self.chunk_logit, CHUNK_LOGITS)
        _checks.choice("partition", self.partition, PARTITIONS)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        _checks.real("noise_scale", self.noise_scale, strict=True)
        if not isinstance(self.shared_noise, bool):
            raise TypeError(f"shared_noise must be a bool, got {self.shared_noise!r} ({type(self.shared_noise).__name__})")
        if self.window == 0 and self.chunk_size == 0:
            raise ValueError("window=0 and chunk_size=0 leave nothing to attend; set at least one of them > 0")
        if self.partition == "disjoint" and self.window > 0 and self.chunk_size > 0 and self.window % self.chunk_size:
            raise ValueError(
                f"window={self.window} must be a multiple of chunk_size={self.chunk_size} with partition='disjoint': "
                "it drops the chunks inside each window block, so a block must consist of whole chunks "
                "(partition='official' keeps every chunk and accepts any sizes)"
            )
        if self.causal and self.window == 0 and (self.partition == "official" or self.chunk_size > 1):
            raise ValueError(
                f"causal EVA with window=0 needs partition='disjoint' and chunk_size=1, got partition="
                f"{self.partition!r}, chunk_size={self.chunk_size}: early queries would see no complete chunk"
            )

    @property
    def noise_kind(self) -> str:
        return "eps"

    @property
    def _zero_filled(self) -> bool:
        """Whether chunks follow the released code's padding (official partition, non-causal)."""
        return self.partition == "official" and not self.causal

    def _span(self, M: int) -> int:
        """Key positions the chunks cover: M, or M zero-filled up to a multiple of the window (official, non-causal)."""
        return -(-M // self.window) * self.window if self._zero_filled and self.window else M

    def num_chunks(self, k: torch.Tensor) -> int:
        """C chunks over the span of k's positions (ceil(M / chunk_size) but for official padding), 0 without chunks."""
        return _Chunks.geometry(self.chunk_size, self._span(k.shape[-2]))[1] if self.chunk_size else 0

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        """Shape of one replicate's noise: eps (C, S_c, d), or (*batch, C, S_c, d) without shared noise."""
        batch = noise_batch(q, self.shared_noise)
        return (*batch, self.num_chunks(k), self.samples_per_chunk, q.shape[-1])

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
        eps = draw.for_estimator(self, q, k, inp.x)
        R, S, batch, (N, dv) = eps.shape[0], self.samples_per_chunk, inp.x.shape[:-2], (q.shape[-2], v.shape[-1])

        window = _Window(inp, self.window, self.causal) if self.window else None
        if not self.chunk_size:
            return window.output(window.lse).expand(R, *inp.x.shape[:-1], dv).to(inp.out_dtype)

        if self.shared_noise:  # one draw broadcast over the batch axes
            eps = eps.reshape(R, *([1] * len(batch)), *eps.shape[1:])
        chunks = _Chunks(inp, self.chunk_size, span=self._span(k.shape[-2]), zero_filled=self._zero_filled)
        rf = self.chunk_logit == "rf"
        values = _ChunkValues(inp, chunks, self._proposal_mean(inp, chunks), eps, self.noise_scale, joint=rf)
        chunk_logits = values.rf_logits if rf else self._chunk_logits(inp, chunks)
        out = torch.empty(R, *inp.x.shape[:-1], dv, dtype=inp.x.dtype, device=inp.x.device)
        lse = torch.empty(*((R,) if rf else ()), *inp.x.shape[:-1], dtype=inp.x.dtype, device=inp.x.device)
        # visibility depends on n // chunk_size only (disjoint: window is a multiple of it): one mask row per group
        group = self.chunk_size
        hidden = ~self._visible(torch.arange(0, N, group, device=inp.x.device), chunks)  # (ceil(N / group), C)
        if self.chunk_logit in ("exact", "rf"):
            hidden |= chunks.empty  # a chunk made only of padding has no mass
        hidden = hidden if bool(hidden.any()) else None  # None: every query sees every chunk
        per_row = math.prod(batch) * chunks.count * (R * S if rf or S > 1 else 1)
        rows = max(1, QUERY_BLOCK_ELEMENTS // per_row // group) * group
        for start in range(0, N, rows):  # blocks of queries keep the (rows, C) logits in cache
            stop = min(N, start + rows)
            x = inp.x[..., start:stop, :]
            logits = chunk_logits(x)  # (*b, rows, C); "rf": (R, *b, rows, S C), sample-major
            if hidden is not None:
                block = hidden[start // group : -(-stop // group)].repeat_interleave(group, dim=0)[: stop - start]
                block = block.repeat(1, S) if rf else block
                logits = logits.masked_fill_(block, -math.inf) if inp.inplace else logits.masked_fill(block, -math.inf)
            block_lse = torch.logsumexp(logits, dim=-1)
            if window is not None:
                block_lse = torch.logaddexp(block_lse, window.lse[..., start:stop])
            shift = block_lse.unsqueeze(-1)
            weights = logits.sub_(shift).exp_() if inp.inplace else (logits - shift).exp()
            out[..., start:stop, :] = values.output(x, weights)
            lse[..., start:stop] = block_lse
        if window is not None:
            out += window.output(lse)
        return out.to(inp.out_dtype)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Deterministic per call: the window (N w (2d + 2dv + 4)) and the chunk logits (2 N C d, or the
        quadratic oracle for chunk_logit="exact", none for "rf"); per replicate: log xi per chunk over the P = C L
        key positions the chunks cover (official padding included), its softmax and chunk averages, and the mix
        over chunks (with S_c > 1 or "rf" the query-dependent per-sample terms; with "rf" the normaliser depends
        on the draw, so the window's output, N w (2dv + 2), moves to the per-replicate count)."""
        w = min(self.window, N)
        rf = self.chunk_logit == "rf" and self.chunk_size > 0
        fixed = memory_fixed = rep = memory = 0.0
        if w:
            fixed += N * w * (2 * d + 2) if rf else N * w * (2 * d + 2 * dv + 4)
            rep += N * w * (2 * dv + 2) if rf else 0.0
            memory_fixed += 2 * N * w + N * dv
        if not self.chunk_size:
            return Cost.per_element(fixed, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)
        L, C = _Chunks.geometry(self.chunk_size, self._span(M))
        P, S = C * L, self.samples_per_chunk
        if self.chunk_logit == "exact":
            fixed += 2 * N * M * d + 2 * N * M
        elif not rf:
            fixed += 2 * N * C * d + 2 * M * d
        rep += 2 * P * S * d + 4 * P * S + 2 * P * S * dv
        memory += 3 * P * S + C * S * dv + N * dv
        rows = min(N, self.chunk_size)  # the fewest queries per block; blocks hold about QUERY_BLOCK_ELEMENTS
        if S == 1 and not rf:
            rep += 2 * N * C * dv
            memory_fixed += 3 * C * max(rows, min(N, QUERY_BLOCK_ELEMENTS // C)) + N
        else:
            rep += 2 * N * C * S * (d + dv) + 4 * N * C * S
            memory_fixed += 3 * QUERY_BLOCK_ELEMENTS + N
            memory += 3 * rows * C * S + (2 * N * w + N if rf else 0)
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
        """A function of a block of queries x (*b, rows, d) giving the deterministic stand-ins for
        log sum_{P_c} exp(l_nm), (*b, rows, C); the key-side work is done here, once."""
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
    """The draw-dependent chunk values beta_{n,c}: per-(sample, chunk) SNIS averages computed once, mixed per
    query block. ``joint``: the per-sample terms are the chunk_logit="rf" logits, normalised with the window."""

    def __init__(self, inp: Scaled, chunks: "_Chunks", mu: torch.Tensor, eps: torch.Tensor, sigma: float, joint: bool):
        C, S, d = eps.shape[-3:]
        w = mu.unsqueeze(-2) + sigma * eps  # (R, *b, C, S, d): eps has the batch axes or ones there
        y, vals = chunks.split(inp.y), chunks.split(inp.v)  # (*b, C, L, d), (*b, C, L, dv)
        # padded keys get -inf through their half norm, but for chunks made only of padding: their zero keys
        # then give beta = the mean of zero values = 0; one batched GEMM per chunk over replicates and samples
        padding = ~chunks.valid & ~chunks.empty.unsqueeze(-1)
        half = (0.5 * (y * y).sum(-1)).masked_fill(padding, math.inf)  # (*b, C, L)
        log_xi = torch.einsum("...cld,r...csd->r...cls", y, w) - half.unsqueeze(-1)  # (R, *b, C, L, S)
        averages = torch.einsum("r...cls,...clv->r...scv", torch.softmax(log_xi, dim=-2), vals)  # (R, *b, S, C, dv)
        self.samples, self.count, self.joint = S, C, joint
        self.averages = averages.flatten(-3, -2)  # (R, *b, S C, dv), sample-major so softmaxes over s run along C
        if S > 1 or joint:
            # log a_s + log K_cs = w.x_n - |x_n|^2/2 + offset + d log sigma, with K_cs = sum_{P_c} xi(y_m, w_s) and
            # log N(w;0,I)/N(w;mu,sigma^2 I) = -w.mu + |mu|^2/2 + (1 - sigma^2)|eps|^2/2 + d log sigma
            log_mass = torch.logsumexp(log_xi, dim=-2)  # (R, *b, C, S)
            offset = log_mass - (w * mu.unsqueeze(-2)).sum(-1) + 0.5 * (mu * mu).sum(-1, keepdim=True)
            offset = offset + 0.5 * (1.0 - sigma**2) * (eps * eps).sum(-1)
            self.offset = offset.transpose(-1, -2)  # (R, *b, S, C)
            self.w = w.transpose(-3, -2).flatten(-3, -2)  # (R, *b, S C, d)
            self.rf_shift = d * math.log(sigma) - math.log(S)  # the "rf" logit averages the S samples

    def rf_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log of the terms (1/S) a_s K_cs of the chunk-mass estimate for queries x (*b, rows, d): (R, *b, rows, S C);
        their log-sum-exp over s is chunk_logit "rf"."""
        logits = torch.einsum("...nd,r...jd->r...nj", x, self.w) + self.offset.flatten(-2).unsqueeze(-2)
        return logits.add_(self.rf_shift - 0.5 * (x * x).sum(-1, keepdim=True))

    def output(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_c weights_nc beta_{n,c} for queries x (*b, rows, d) with chunk weights (*b, rows, C), or with the
        joint "rf" weights (R, *b, rows, S C) of sum_{c, s} weights_ncs averages_cs: (R, *b, rows, dv)."""
        if self.joint:
            return weights @ self.averages
        if self.samples == 1:  # the importance weights cancel: beta_c does not depend on the query
            return torch.einsum("...nc,r...cv->r...nv", weights, self.averages)
        logits = torch.einsum("...nd,r...jd->r...nj", x, self.w).unflatten(-1, (self.samples, self.count))
        mix = torch.softmax(logits + self.offset.unsqueeze(-3), dim=-2) * weights.unsqueeze(-2)  # (R, *b, rows, S, C)
        return mix.flatten(-2) @ self.averages


class _Chunks:
    """Contiguous chunks of ``size`` positions over ``span`` >= M positions (default M; positions from M on are
    padding, zero-filled); the last chunk may be shorter, unless ``zero_filled``: then the padding continues to
    a whole chunk and means average over the full chunk length, as the released code does."""

    def __init__(self, inp: Scaled, size: int, *, span: int | None = None, zero_filled: bool = False):
        M, device = inp.y.shape[-2], inp.y.device
        span = M if span is None else span
        self.length, self.count = self.geometry(size, span)
        position = torch.arange(self.count * self.length, device=device).view(self.count, self.length)
        self.valid = position < M  # (C, L)
        self.empty = ~self.valid.any(-1)  # (C,) chunks made only of padding
        sizes = torch.full((self.count,), self.length, device=device) if zero_filled else self.valid.sum(-1)
        self.sizes = sizes.to(inp.y.dtype)  # (C,) the divisor of chunk means
        self.ends = torch.clamp((torch.arange(self.count, device=device) + 1) * self.length, max=M)  # exclusive
        self._pad = self.count * self.length - M

    @staticmethod
    def geometry(size: int, span: int) -> tuple[int, int]:
        """(chunk length L, chunk count C) for chunks of ``size`` over ``span`` positions (C = 0 for no keys)."""
        length = max(1, min(size, span))
        return length, math.ceil(span / length)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """(*b, M, e) -> (*b, C, L, e), zero-padded."""
        return torch.nn.functional.pad(t, (0, 0, 0, self._pad)).unflatten(-2, (self.count, self.length))

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Per-chunk mean, over real positions or (``zero_filled``) the full chunk length: (*b, M, e) -> (*b, C, e)."""
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
