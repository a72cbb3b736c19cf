"""Monte-Carlo metrics of an estimator against exact attention (docs/theory.md section 6), with 95% intervals.

Replicates are drawn in fixed blocks of ``NOISE_BLOCK``, each from a generator seeded by (seed, block) on the
inputs' device, so the numbers depend on the seed and the device type only, not on the batch size, the memory
budget or the run order (reproducibility contract: ``evalab.estimators.draw``); estimators whose draws
have the same kind and layout see the same noise for the same seed (common random numbers). Replicates are
evaluated in vectorised batches sized to a memory budget (noise included) and accumulated in float64 per
jackknife group.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import _checks
from .cost import estimate_cost
from ..estimators.base import Cost
from ..estimators.draw import Draw, seeded_generator
from .intervals import Estimate, jackknife_interval, mean_interval, quantile_interval
from .result import Result, estimator_columns
from ..estimators.registry import ESTIMATORS, estimator_name, make_estimator
from ..estimators.softmax import softmax_attention, softmax_bytes

NOISE_BLOCK = 64
#: Noise kinds drawn as one stream of standard normals (one ``draw.gaussian_noise`` call per draw): on the CPU a
#: block of them can be drawn in consecutive pieces with the same numbers.
STREAM_KINDS = ("eps", "omega:iid")
GROUPS = 20
CPU_WORKING_SET = 32 * 2**20  # batches aim at this many bytes: cache-sized tensors run faster on CPU,
DEVICE_WORKING_SET = 2**30  # and big batches amortise kernel launches on accelerators
MATRIX_ELEMENTS = 2**22  # matrix metrics run by default when batch x N x M is at most this

SUMMED = ("mse", "variance", "bias2", "rel_mse", "rel_variance", "rel_bias2")
METRICS = SUMMED + ("rel_error", "rel_error_median", "rel_error_p90")
MATRIX_METRICS = ("matrix_rel_error", "row_kl", "row_tv")


@dataclass(frozen=True, repr=False)  # the repr of Result
class MCResult(Result):
    """Monte-Carlo metrics of one estimator on one input.

    metrics: name -> Estimate (value and 95% interval) for METRICS (+ MATRIX_METRICS when computed).
    per_query: mse, variance, bias2 and reference_power |Y_n|^2 as float64 tensors (*batch, N).
    replicate_error: (R,) mean over queries of |Yhat_r - Y|^2; rel_error_samples: (R,) |Yhat_r - Y|_F / |Y|_F.
    """

    estimator: object
    replicates: int
    seed: int
    sizes: dict
    cost: Cost
    metrics: dict
    per_query: dict
    replicate_error: np.ndarray
    rel_error_samples: np.ndarray
    matrix_skipped: str | None = None
    leave_one_out: dict = field(default_factory=dict, repr=False)

    name_width = 18

    def columns(self) -> dict:
        return {**estimator_columns(self.estimator), **self.sizes, "replicates": self.replicates, "seed": self.seed}

    def extra_columns(self) -> dict:
        return {**self.cost.as_dict(), "matrix_skipped": self.matrix_skipped}

    def per_query_frame(self) -> pd.DataFrame:
        """One row per (batch index, query) with mse, variance, bias2."""
        shape = self.per_query["mse"].shape
        index = np.indices(shape).reshape(len(shape), -1)
        cols = {f"batch{i}": index[i] for i in range(len(shape) - 1)}
        cols["query"] = index[-1]
        cols.update({k: t.reshape(-1).numpy() for k, t in self.per_query.items()})
        return pd.DataFrame(cols)

    def per_batch_frame(self) -> pd.DataFrame:
        """One row per batch element (e.g. layer and head): mse, variance, bias2 averaged over queries, and
        their relative versions (divided by that element's mean |Y_n|^2). No intervals."""
        shape = self.per_query["mse"].shape[:-1]
        index = np.indices(shape).reshape(len(shape), -1)
        cols = {f"batch{i}": index[i] for i in range(len(shape))}
        power = self.per_query["reference_power"].mean(-1).reshape(-1).numpy()
        for name in ("mse", "variance", "bias2"):
            value = self.per_query[name].mean(-1).reshape(-1).numpy()
            cols[name], cols[f"rel_{name}"] = value, value / power
        return pd.DataFrame(cols)

    def title(self) -> str:
        return f"MCResult({type(self.estimator).__name__}, replicates={self.replicates}, seed={self.seed}, {self.sizes})"

    def notes(self) -> list[str]:
        return [f"  matrix metrics skipped: {self.matrix_skipped}"] if self.matrix_skipped else []


def draws_in_pieces(estimator, numbers: int, batch: int, device: str) -> bool:
    """Whether ``iter_draws`` draws each batch of ``batch`` replicates as its own piece of a noise block (memory:
    the batch's noise only) rather than caching the whole NOISE_BLOCK block: for batches that divide the block,
    noise that is one stream of standard normals (STREAM_KINDS) drawn on the CPU, and pieces of a multiple of
    16 numbers (``numbers`` per replicate), the pieces hold exactly the numbers of the whole block (see
    ``draw.gaussian_noise``)."""
    return (batch < NOISE_BLOCK and NOISE_BLOCK % batch == 0 and estimator.noise_kind in STREAM_KINDS
            and device == "cpu" and (batch * numbers) % 16 == 0)


def noise_numbers(estimator, *, N: int, M: int, d: int, batch: int = 1) -> int:
    """Numbers of noise one replicate of ``estimator`` draws for ``batch`` elements of N queries and M keys."""
    q, k = torch.zeros(()).expand(batch, N, d), torch.zeros(()).expand(batch, M, d)  # the shapes only
    return math.prod(estimator.noise_layout(q, k))


def iter_draws(estimator, q, k, replicates: int, seed: int, batch: int) -> Iterator[tuple[int, Draw]]:
    """Yield (first replicate index, Draw) for consecutive batches; noise is fixed per NOISE_BLOCK block, drawn
    on q's device from the generator of (seed, block) (``draw.seeded_generator``), whole or, where
    ``draws_in_pieces``, one batch at a time with the same numbers."""
    if draws_in_pieces(estimator, math.prod(estimator.noise_layout(q, k)), batch, q.device.type):
        generator = None
        for start in range(0, replicates, batch):
            if start % NOISE_BLOCK == 0:
                generator = seeded_generator(seed, start // NOISE_BLOCK, device=q.device)
            yield start, estimator.draw(q, k, replicates=min(batch, replicates - start), generator=generator)
        return
    cached: tuple[int, Draw] | None = None
    for start in range(0, replicates, batch):
        stop = min(replicates, start + batch)
        pieces = []
        for block in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
            if cached is None or cached[0] != block:
                cached = None  # let the previous block go before drawing the next
                generator = seeded_generator(seed, block, device=q.device)
                cached = (block, estimator.draw(q, k, replicates=NOISE_BLOCK, generator=generator))
            lo = max(start - block * NOISE_BLOCK, 0)
            hi = min(stop - block * NOISE_BLOCK, NOISE_BLOCK)
            pieces.append(cached[1][lo:hi].noise)
        yield start, Draw(torch.cat(pieces) if len(pieces) > 1 else pieces[0], cached[1].kind)


def noise_batch_size(cost: Cost, estimator, numbers: int, replicates: int, max_memory: float,
                     extra_per_replicate: float = 0.0, device: str = "cpu", itemsize: int = 4) -> int:
    """``batch_size`` with the noise counted (``numbers`` per replicate): per replicate its float64 draw and its
    copy in the compute dtype (``itemsize`` bytes); and, unless the batches are drawn in pieces
    (``draws_in_pieces``), the whole cached NOISE_BLOCK block beside them."""
    per = extra_per_replicate + numbers * (8 + itemsize)
    b = batch_size(cost, replicates, max_memory, per, device)
    if draws_in_pieces(estimator, numbers, b, device):
        return b
    whole = dataclasses.replace(cost, fixed_bytes=cost.fixed_bytes + min(replicates, NOISE_BLOCK) * numbers * 8)
    try:
        return batch_size(whole, replicates, max_memory, per, device)
    except MemoryError:
        raise MemoryError(
            f"a block of {NOISE_BLOCK} replicates of {estimator.noise_kind!r} noise ({NOISE_BLOCK * numbers * 8 / 2**30:.3g} "
            f"GiB float64) is drawn whole and does not fit max_memory={max_memory / 2**30:.3g} GiB with a batch; "
            "raise max_memory or shrink the inputs") from None


def batch_size(cost: Cost, replicates: int, max_memory: float, extra_per_replicate: float = 0.0, device: str = "cpu") -> int:
    """Replicates per batch: within ``max_memory`` bytes; otherwise near the device's working set, but
    large enough that the per-replicate work outweighs the deterministic work every call repeats (window and
    chunk logits, EVA's exact-logit oracle); a multiple or a divisor of NOISE_BLOCK."""
    per = cost.replicate_bytes + extra_per_replicate
    room = max_memory - cost.fixed_bytes
    if room < per:
        raise MemoryError(
            f"one replicate needs about {(cost.fixed_bytes + per) / 2**30:.3g} GiB, over max_memory="
            f"{max_memory / 2**30:.3g} GiB; raise max_memory or shrink the inputs"
        )
    amortise = cost.fixed_flops / cost.replicate_flops if cost.replicate_flops > 0 else 0.0  # NaN: no model
    working_set = CPU_WORKING_SET if device == "cpu" else DEVICE_WORKING_SET
    target = max(int(working_set // per), math.ceil(amortise) if math.isfinite(amortise) else 1) if per > 0 else replicates
    b = max(1, min(replicates, int(room // per) if per > 0 else replicates, target))
    if b == replicates:
        return b
    return b - b % NOISE_BLOCK if b >= NOISE_BLOCK else 1 << (b.bit_length() - 1)


def held_bytes(*, N: int, M: int, dv: int, batch: int, itemsize: int, replicates: int, exact_reference: bool) -> int:
    """Bytes a monte_carlo run holds besides its batches: the reference (its computation's working memory when
    ``exact_reference``), its float64 copy, replicate 0 and the per-group float64 sums of _Accumulator."""
    groups = min(GROUPS, replicates)
    reference = softmax_bytes(N=N, M=M, dv=dv, batch=batch, itemsize=itemsize) if exact_reference else batch * N * dv * itemsize
    return reference + batch * N * ((groups + 2) * dv * 8 + 2 * dv * itemsize + (groups + 1) * 8)


def plan_batches(estimator, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4, replicates: int,
                 max_memory: float, matrix: bool | None = None, exact_reference: bool = True, device: str = "cpu",
                 held: float = 0.0, option: str = "max_memory") -> tuple[int, bool, str | None]:
    """monte_carlo's memory plan, made before it allocates anything: (replicates per batch, whether the matrix
    metrics run, why not). ``held`` bytes are taken already (the inputs). Raises a one-line MemoryError naming the
    sizes and ``option`` when even one replicate does not fit in ``max_memory`` bytes."""
    cost = estimate_cost(estimator, N=N, M=M, d=d, dv=dv, batch=batch, itemsize=itemsize)
    fixed = held + held_bytes(N=N, M=M, dv=dv, batch=batch, itemsize=itemsize, replicates=replicates,
                              exact_reference=exact_reference)
    numbers = noise_numbers(estimator, N=N, M=M, d=d, batch=batch)
    out_bytes = 3 * batch * N * dv * 8
    noise = numbers * (8 + itemsize)  # one replicate's draw and its copy in the compute dtype
    sizes = f"N={N}, M={M}, d={d}, dv={dv}, batch={batch}"
    requested, matrix = matrix, batch * N * M <= MATRIX_ELEMENTS if matrix is None else matrix
    if matrix:  # the matrix call (dv = M), its float64 copies and the exact matrix share each batch
        matrix_cost = estimate_cost(estimator, N=N, M=M, d=d, dv=M, batch=batch, itemsize=itemsize)
        with_matrix = dataclasses.replace(cost, fixed_bytes=fixed + cost.fixed_bytes + matrix_cost.fixed_bytes
                                          + batch * N * M * (8 + itemsize))
        extra = out_bytes + matrix_cost.replicate_bytes + 3 * batch * N * M * 8
        one = with_matrix.fixed_bytes + with_matrix.replicate_bytes + extra + noise
        if one <= max_memory:
            try:
                return noise_batch_size(with_matrix, estimator, numbers, replicates, max_memory, extra, device,
                                        itemsize), True, None
            except MemoryError:
                if requested:
                    raise
        if requested:
            _checks.memory(f"monte_carlo with the matrix metrics ({sizes})", one, max_memory,
                           f"pass matrix=False to skip them, shrink the inputs or raise {option}")
    base = dataclasses.replace(cost, fixed_bytes=fixed + cost.fixed_bytes)
    _checks.memory(f"monte_carlo ({sizes}, one replicate per batch)",
                   base.fixed_bytes + base.replicate_bytes + out_bytes + noise, max_memory,
                   f"shrink the inputs or raise {option}")
    b = noise_batch_size(base, estimator, numbers, replicates, max_memory, out_bytes, device, itemsize)
    return b, False, "over max_memory" if matrix else "disabled"


class _Accumulator:
    """Per-group float64 sums of d = Yhat - shift (shift = replicate 0) and |d|^2, plus per-replicate errors."""

    def __init__(self, reference: torch.Tensor, replicates: int):
        self.ref = reference.to(torch.float64)
        self.R, self.G = replicates, min(GROUPS, replicates)
        shape = self.ref.shape
        self.sum_d = torch.zeros(self.G, *shape, dtype=torch.float64, device=self.ref.device)
        self.sum_sq = torch.zeros(self.G, *shape[:-1], dtype=torch.float64, device=self.ref.device)
        self.shift: torch.Tensor | None = None
        self.power = (self.ref**2).sum(-1)  # |Y_n|^2
        self.ref_sq, self.ref_fro = float(self.power.mean()), math.sqrt(float(self.power.sum()))
        self.errors: list[torch.Tensor] = []
        self.rel: list[torch.Tensor] = []

    def _bound(self, g: int) -> int:
        """First replicate of group g (groups are contiguous runs of replicates)."""
        return -(-g * self.R // self.G)

    def _group_size(self, g: int) -> int:
        return self._bound(g + 1) - self._bound(g)

    def add(self, start: int, y: torch.Tensor) -> None:
        """Accumulate estimates y (b, *batch, N, dv) of replicates start..start+b, in y's dtype with float64 sums."""
        if self.shift is None:
            self.shift = y[0].to(torch.float64)
            self._shift, self._ref = y[0].clone(), self.ref.to(y.dtype)
        d = y - self._shift
        sq = (d * d).sum(-1)
        stop = start + y.shape[0]
        first, last = start * self.G // self.R, (stop - 1) * self.G // self.R
        for g in range(first, last + 1):  # groups are contiguous runs of replicates
            lo = max(start, self._bound(g)) - start
            hi = min(stop, self._bound(g + 1)) - start
            self.sum_d[g] += d[lo:hi].sum(0, dtype=torch.float64)
            self.sum_sq[g] += sq[lo:hi].sum(0, dtype=torch.float64)
        err = d.add_(self._shift - self._ref)  # y - Y, reusing d's memory
        err = (err * err).sum(-1).flatten(1).sum(-1, dtype=torch.float64)  # (b,)
        self.errors.append(err / sq[0].numel())
        self.rel.append(err.sqrt() / self.ref_fro)

    def _per_query(self, sum_d, sum_sq, n):
        mean_d = sum_d / n
        variance = ((sum_sq - n * (mean_d * mean_d).sum(-1)) / (n - 1)).clamp_min(0.0)
        bias2 = ((self.shift + mean_d - self.ref) ** 2).sum(-1) - variance / n
        return {"mse": variance + bias2, "variance": variance, "bias2": bias2}

    def _aggregates(self, pq: dict) -> dict[str, float]:
        out = {name: float(t.mean()) for name, t in pq.items()}
        out.update({f"rel_{name}": value / self.ref_sq for name, value in list(out.items())})
        return out

    def finish(self) -> tuple[dict, dict, dict, np.ndarray, np.ndarray]:
        total_d, total_sq, n = self.sum_d.sum(0), self.sum_sq.sum(0), float(self.R)
        full_pq = self._per_query(total_d, total_sq, n)
        full = self._aggregates(full_pq)
        loo = [self._aggregates(self._per_query(total_d - self.sum_d[g], total_sq - self.sum_sq[g], n - self._group_size(g)))
               for g in range(self.G)]
        leave_one_out = {name: np.array([row[name] for row in loo]) for name in SUMMED}
        metrics = {name: jackknife_interval(full[name], leave_one_out[name]) for name in SUMMED}
        rel = torch.cat(self.rel).cpu().numpy()
        metrics["rel_error"] = mean_interval(rel)
        metrics["rel_error_median"] = quantile_interval(rel, 0.5)
        metrics["rel_error_p90"] = quantile_interval(rel, 0.9)
        per_query = {k: t.cpu() for k, t in full_pq.items()}
        per_query["reference_power"] = self.power.cpu()
        return metrics, leave_one_out, per_query, torch.cat(self.errors).cpu().numpy(), rel


def _one_hot_values(k: torch.Tensor) -> torch.Tensor:
    """V = I_M for keys k (*b, M, d): (*b, M, M), an expanded view."""
    M = k.shape[-2]
    return torch.eye(M, dtype=k.dtype, device=k.device).expand(*k.shape[:-2], M, M)


def attention_matrix(estimator, q: torch.Tensor, k: torch.Tensor, draw: Draw, *,
                     max_memory: float | None = None) -> torch.Tensor:
    """The attention matrix an estimator implies: its output for one-hot values V = I_M, (R, *b, N, M).

    Estimators are linear in v for a fixed draw, so the columns are computed in blocks of one-hot values, each
    within ``max_memory`` bytes (default 2 GiB) beside the result; a MemoryError says what is needed otherwise.
    """
    _checks.qkv(q, k, causal=getattr(estimator, "causal", False))
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else _checks.real("max_memory", max_memory, strict=True)
    R, B, (N, d), M = draw.replicates, math.prod(q.shape[:-2]), q.shape[-2:], k.shape[-2]
    itemsize = 8 if _checks.compute_dtype(q, k) == torch.float64 else 4
    result = R * B * N * M * itemsize

    def needed(width: int) -> float:
        cost = estimate_cost(estimator, N=N, M=M, d=d, dv=width, batch=B, itemsize=itemsize)
        return result + B * M * width * itemsize + (cost.bytes(R) if math.isfinite(cost.bytes(R)) else 0.0)

    width = M
    while width > 1 and needed(width) > max_memory:
        width = (width + 1) // 2
    if needed(width) > max_memory:
        raise MemoryError(
            f"attention_matrix needs about {needed(width) / 2**30:.3g} GiB for R x N x M = {R} x {N} x {M} "
            f"(batch {B}), over max_memory={max_memory / 2**30:.3g} GiB; pass fewer replicates (draw[:r]), "
            "fewer queries or keys, or raise max_memory"
        )
    eye = _one_hot_values(k)
    if width == M:
        return estimator(q, k, eye, draw)
    return torch.cat([estimator(q, k, eye[..., m0:m0 + width], draw) for m0 in range(0, M, width)], dim=-1)


def _matrix_errors(a_hat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(b, 3): relative Frobenius error, mean row KL(A || Ahat) and mean row total variation per replicate."""
    a_hat, a = a_hat.to(torch.float64).flatten(1, -2), a.to(torch.float64).flatten(0, -2)
    fro = ((a_hat - a) ** 2).sum((-2, -1)).sqrt() / (a**2).sum().sqrt()
    kl = torch.where(a > 0, a * (a.log() - a_hat.log()), 0.0).sum(-1).mean(-1)  # inf where Ahat misses mass
    tv = 0.5 * (a_hat - a).abs().sum(-1).mean(-1)
    return torch.stack([fro, kl, tv], dim=-1)


def _rows_are_distributions(a_hat: torch.Tensor) -> str | None:
    tol = 1e-4 if a_hat.dtype != torch.float64 else 1e-9
    low, sums = float(a_hat.min()), a_hat.sum(-1)
    if low < -tol:
        return f"rows have negative entries (min {low:.3g})"
    spread = float((sums - 1).abs().max())
    if spread > tol:
        return f"rows do not sum to one (max |row sum - 1| = {spread:.3g})"
    return None


def as_estimator(estimator):
    """``estimator`` itself, or the estimator a registered name (any case: "RFA", "eva") builds with defaults."""
    if not isinstance(estimator, str):
        if not callable(getattr(estimator, "draw", None)):
            raise TypeError(f"estimator must be an estimator (with draw and __call__) or a registered name, got "
                            f"{estimator!r} ({type(estimator).__name__})")
        return estimator
    names = {name.lower(): name for name in ESTIMATORS}
    if estimator.lower() not in names:
        raise ValueError(f"estimator={estimator!r} is not a registered estimator; expected an estimator or one of "
                         f"{', '.join(map(repr, ESTIMATORS))}")
    return make_estimator(names[estimator.lower()])


def monte_carlo(
    estimator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    replicates: int,
    seed: int = 0,
    reference: torch.Tensor | None = None,
    max_memory: float | None = None,
    matrix: bool | None = None,
    progress: bool = False,
) -> MCResult:
    """Bias, variance and error of ``estimator`` over ``replicates`` independent draws, with 95% intervals.

    ``estimator``: an estimator, or a registered name ("RFA", "eva") built with its defaults.
    q (*b, N, d), k (*b, M, d), v (*b, M, dv) (detached: no gradients flow); ``reference`` (*b, N, dv) defaults
    to exact softmax attention. ``max_memory`` (bytes, default 2 GiB) bounds the run: the reference, the
    per-group sums and each vectorised batch of replicates; a run that cannot fit one replicate is refused with a
    MemoryError before anything is allocated. ``progress`` shows bars (with an ETA) for the exact reference and the
    replicates. ``matrix`` adds metrics of
    the implied attention matrix (V = I_M); by default when batch x N x M <= MATRIX_ELEMENTS and the matrix
    work fits in ``max_memory`` (otherwise ``matrix_skipped`` says why); ``matrix=True`` raises a MemoryError
    when it does not fit.
    """
    estimator = as_estimator(estimator)
    _checks.integer("replicates", replicates, minimum=2)
    _checks.integer("seed", seed, minimum=0)
    _checks.boolean("progress", progress)
    _checks.qkv(q, k, v, causal=getattr(estimator, "causal", False))
    q, k, v = q.detach(), k.detach(), v.detach()  # measurement needs no autograd graph (see gradient_gap)
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else _checks.real("max_memory", max_memory, strict=True)
    batch_elems, (N, d), (M, dv) = math.prod(q.shape[:-2]), q.shape[-2:], v.shape[-2:]
    sizes = {"seq_len": N, "key_len": M, "d": d, "dv": dv, "batch": batch_elems}
    itemsize = 8 if _checks.compute_dtype(q, k, v) == torch.float64 else 4
    cost = estimate_cost(estimator, N=N, M=M, d=d, dv=dv, batch=batch_elems, itemsize=itemsize)
    scale, causal = getattr(estimator, "scale", None), getattr(estimator, "causal", False)
    if reference is not None:
        _checks.tensor("reference", reference, min_dim=1)
        if reference.shape != q.shape[:-1] + (dv,):
            raise ValueError(f"reference must have shape {tuple(q.shape[:-1]) + (dv,)}, got {tuple(reference.shape)}")
        _checks.finite("reference", reference)
        reference = reference.detach()
    b, matrix, skipped = plan_batches(estimator, N=N, M=M, d=d, dv=dv, batch=batch_elems, itemsize=itemsize,
                                      replicates=replicates, max_memory=max_memory, matrix=matrix,
                                      exact_reference=reference is None, device=q.device.type)
    if reference is None:
        reference = softmax_attention(q, k, v, scale=scale, causal=causal, max_memory=max_memory, progress=progress)

    acc = _Accumulator(reference, replicates)
    matrix_rows = []
    if matrix:
        eye = _one_hot_values(k)
        exact_matrix = softmax_attention(q, k, eye, scale=scale, causal=causal, max_memory=max_memory)
    draws = iter_draws(estimator, q, k, replicates, seed, b)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=replicates, desc=f"monte_carlo {estimator_name(estimator)}", unit="replicate")
    for start, draw in draws:
        acc.add(start, estimator(q, k, v, draw))
        if matrix and skipped is None:
            a_hat = estimator(q, k, eye, draw)
            skipped = _rows_are_distributions(a_hat)
            matrix_rows.append(_matrix_errors(a_hat, exact_matrix))
        if progress:
            bar.update(draw.replicates)
    if progress:
        bar.close()
    metrics, loo, per_query, errors, rel = acc.finish()
    if matrix and skipped is None:
        values = torch.cat(matrix_rows).cpu().numpy()
        for i, name in enumerate(MATRIX_METRICS):
            finite = np.isfinite(values[:, i]).all()
            metrics[name] = mean_interval(values[:, i]) if finite else Estimate(math.inf, math.inf, math.inf)
    return MCResult(estimator, replicates, seed, sizes, cost, metrics, per_query, errors, rel, skipped, loo)


@dataclass(frozen=True)
class Comparison:
    """Metrics of several estimators on the same input and seed, with paired differences.

    results: name -> MCResult. Every estimator ran on the same inputs with the same seed; shared_draws[a, b]
    says whether a and b also saw the same noise, which holds only where their draws have the same kind and
    layout (common random numbers, sharper differences: e.g. RFA and ControlVariates with the same features and sampler,
    not RFA and EVA).
    Differences without shared draws are still valid, as between independent samples.
    """

    results: dict
    shared_draws: dict = field(repr=False)

    def difference(self, a: str, b: str, metric: str = "mse") -> Estimate:
        """metric(a) - metric(b) with a 95% interval."""
        ra, rb = self.results[a], self.results[b]
        if metric == "rel_error":
            return mean_interval(ra.rel_error_samples - rb.rel_error_samples)
        if metric not in SUMMED:
            raise ValueError(f"metric={metric!r} has no paired difference; expected one of {', '.join(SUMMED + ('rel_error',))}")
        full = ra.metrics[metric].value - rb.metrics[metric].value
        return jackknife_interval(full, ra.leave_one_out[metric] - rb.leave_one_out[metric])

    def to_frame(self) -> pd.DataFrame:
        """One row per estimator (its metrics), with a ``name`` column."""
        return pd.concat([r.to_frame().assign(name=n) for n, r in self.results.items()], ignore_index=True)

    def differences(self, baseline: str | None = None, metrics=("mse", "variance", "bias2", "rel_error")) -> pd.DataFrame:
        """Paired differences of every estimator against ``baseline`` (default: the first one)."""
        names = list(self.results)
        baseline = names[0] if baseline is None else baseline
        rows = []
        for name in names:
            if name == baseline:
                continue
            for metric in metrics:
                d = self.difference(name, baseline, metric)
                rows.append({"name": name, "baseline": baseline, "metric": metric, "difference": d.value,
                             "low": d.low, "high": d.high, "shared_draws": self.shared_draws[name, baseline]})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return "Comparison\n" + self.differences().to_string(index=False)


def compare(estimators: dict, q, k, v, *, replicates: int, seed: int = 0, **options) -> Comparison:
    """Run ``monte_carlo`` for each named estimator with the same seed; ``options`` go to monte_carlo."""
    if not isinstance(estimators, dict) or len(estimators) < 2:
        raise ValueError(f"estimators must be a dict of at least two named estimators, got {estimators!r}")
    estimators = {name: as_estimator(e) for name, e in estimators.items()}
    if "reference" not in options:
        causal = {getattr(e, "causal", False) for e in estimators.values()}
        scale = {getattr(e, "scale", None) for e in estimators.values()}
        if len(causal) == 1 and len(scale) == 1:
            options["reference"] = softmax_attention(q, k, v, scale=scale.pop(), causal=causal.pop(),
                                                     max_memory=options.get("max_memory"))
    results = {name: monte_carlo(est, q, k, v, replicates=replicates, seed=seed, **options) for name, est in estimators.items()}
    key = {n: (e.noise_kind, tuple(e.noise_layout(q, k))) for n, e in estimators.items()}
    shared = {(a, b): key[a] == key[b] for a in key for b in key}
    return Comparison(results, shared)
