"""LARA: linear randomised attention, self-normalised multiple importance sampling (docs/theory.md section 10).

The target of query n is p_n(omega) = sum_m pi_nm N(omega; x_n + y_m, I), under which the mean of
f(omega) = sum_m softmax_m(omega.y_m - |y_m|^2/2) v_m is softmax attention (RA samples p_n exactly, at
quadratic cost). LARA instead draws from C Gaussian proposals q_c = N(mu_c, sigma^2 I) shared by every query,
omega_{c,s} = mu_c + sigma eps_{c,s}, and weights each sample i = (c, s) per query:

  LARA_n = sum_i a_{n,i} w_{n,i} f(omega_i) / sum_i a_{n,i} w_{n,i},
  log w_{n,i} = log xi(x_n, omega_i) + logsumexp_m log xi(y_m, omega_i) - log [q(omega_i) / N(omega_i; 0, I)],

xi(x, omega) = exp(omega.x - |x|^2/2), so w_{n,i} is p_n(omega_i) / q(omega_i) up to Z_n, which cancels.
- weights "balance": a = 1 and q the mixture sum_c' q_c', exactly the balance heuristic.
- weights "optimal": q = q_c, the sample's own proposal, and
  a_{n,c} = BH_c(omega) + alpha (t_cn - mean_c' t_c'n), BH_c = q_c / sum_c' q_c', t_cn = softmax over the
  queries n of xbar_c.x_n, clamped at 1e-8.
Proposal means mu_c: "mean", the segment mean of x plus that of y over C contiguous segments (N == M), or
"zero". Linear in N and M; non-causal only (as the reference code).

The authors' reference code (HKUNLP/efficient-attention, LinearRA) departs from this in two places:
- it draws its noise in raw coordinates (sigma = d ** -0.25 here) but weights with unit covariance, so it is
  this estimator with noise_scale=1 evaluated on noise d ** -0.25 eps: its weights are not the true ratios;
- with antithetic or two samples per proposal, its optimal weights compute BH over the proposal list
  repeated per sample, which halves BH against the query term: it equals weights="optimal" here with alpha
  doubled and the clamp at 2e-8 (``alpha_floor=2e-8``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks
from .base import Cost
from .draw import Draw, GaussianDraws, noise_batch
from .scaled import Scaled

WEIGHTS = ("balance", "optimal")
PROPOSALS = ("mean", "zero")
#: Default lower clamp of the "optimal" MIS weights alpha, as in the reference code.
ALPHA_FLOOR = 1e-8


@dataclass(frozen=True)
class LARA(GaussianDraws):
    """LARA with C = ``num_proposals`` Gaussian proposals and S_c = ``samples_per_proposal`` noise rows each.

    weights: balance | optimal (``alpha`` scales the optimal weights' query term; alpha = 0 is balance where
      no weight reaches the clamp). The optimal weights normalise t_cn over the query axis n, as the reference
      code does; whether the paper normalises over n or over c is unconfirmed. The clamp on the weights,
      ``alpha_floor`` (default 1e-8), also follows the code (it is not part of the paper's estimator); with
      antithetic or two samples per proposal the released code's weights are ``alpha`` doubled and
      ``alpha_floor=2e-8`` (module docstring).
    proposal: mean (segment means, the authors' uneven split when C does not divide N; each token its own
      proposal when N <= C) | zero.
    antithetic: each noise row gives two samples, mu_c + sigma eps and mu_c - sigma eps (2 S_c per proposal).
    noise_scale: sigma; the importance weights use N(mu_c, sigma^2 I). The reference code draws its noise in
      raw coordinates, sigma = d ** -0.25 in scaled ones, but weights with unit covariance (module docstring).
    shared_noise: one draw for every batch element (True) or one per element (False).
    Call: est(q, k, v, draw) -> (R, *b, N, dv); draw noise (R, C, S_c, d) ((R, *b, C, S_c, d) when not shared).
    """

    num_proposals: int = 16
    samples_per_proposal: int = 1
    weights: str = "balance"
    alpha: float = 1.0
    proposal: str = "mean"
    antithetic: bool = False
    noise_scale: float = 1.0
    causal: bool = False
    shared_noise: bool = True
    scale: float | None = None
    alpha_floor: float = ALPHA_FLOOR
    budget = "samples_per_proposal"  # the parameter along which the error falls (evalab.testing)

    def __post_init__(self) -> None:
        _checks.integer("num_proposals", self.num_proposals)
        _checks.integer("samples_per_proposal", self.samples_per_proposal)
        _checks.choice("weights", self.weights, WEIGHTS)
        _checks.real("alpha", self.alpha, minimum=-math.inf)
        _checks.real("alpha_floor", self.alpha_floor, strict=True)
        _checks.choice("proposal", self.proposal, PROPOSALS)
        _checks.real("noise_scale", self.noise_scale, strict=True)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        if self.causal:
            raise ValueError("causal=True is not supported: LARA's proposals pool over every position "
                             "(non-causal only)")

    @property
    def noise_kind(self) -> str:
        return "eps"

    def num_segments(self, N: int) -> int:
        """Proposals actually used for N queries: C, or N when proposal="mean" and N <= C."""
        return min(self.num_proposals, N) if self.proposal == "mean" else self.num_proposals

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        """Shape of one replicate's noise: eps (C, S_c, d), with the batch axes of q first when not shared."""
        _checks.tensor("q", q)
        batch = noise_batch(q, self.shared_noise)
        return (*batch, self.num_segments(q.shape[-2]), self.samples_per_proposal, q.shape[-1])

    def _check_lengths(self, N: int, M: int) -> None:
        if self.proposal == "mean" and N != M:
            raise ValueError(f"proposal='mean' pairs query and key segments and needs N == M, got N={N}, M={M}")
        if self.weights == "optimal" and N < self.num_segments(N):
            raise ValueError(f"weights='optimal' needs a segment of queries per proposal, got N={N} queries for "
                             f"num_proposals={self.num_proposals}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale)
        self._check_lengths(q.shape[-2], k.shape[-2])
        eps = draw.for_estimator(self, q, k, inp.x)
        batch, R, sigma = inp.x.shape[:-2], eps.shape[0], self.noise_scale
        C, d = eps.shape[-3], eps.shape[-1]
        if self.shared_noise:
            eps = eps.reshape(R, *(1,) * len(batch), *eps.shape[1:])
        if self.antithetic:
            eps = torch.cat([eps, -eps], dim=-2)
        eps = eps.flatten(-3, -2)  # (R, *b', K, d), sample i = c S' + s
        per = eps.shape[-2] // C  # samples per proposal S'
        x_bar = segment_means(inp.x, C) if self.proposal == "mean" or self.weights == "optimal" else None
        if self.proposal == "mean":
            mu = x_bar + segment_means(inp.y, C)  # (*b, C, d)
        else:
            mu = torch.zeros(*batch, C, d, dtype=inp.x.dtype, device=inp.x.device)
        mu_i = mu.repeat_interleave(per, dim=-2)  # (*b, K, d): each sample's own proposal mean
        omega = mu_i + sigma * eps  # (R, *b, K, d)

        # f(omega_i) and log sum_m xi(y_m, omega_i), query-independent
        half_y = 0.5 * (inp.y * inp.y).sum(-1)
        log_xi = (omega @ inp.y.transpose(-1, -2)).sub_(half_y.unsqueeze(-2))  # (R, *b, K, M)
        log_mass = torch.logsumexp(log_xi, dim=-1)
        f = torch.softmax(log_xi, dim=-1) @ inp.v  # (R, *b, K, dv)

        # log q_c'(omega_i) + |eps_i|^2 / 2 (constants shared by every sample dropped), from omega_i - mu_c' =
        # (mu_c - mu_c') + sigma eps_i, so that nothing cancels at large norms; its entry c' = c is 0
        own = (eps * mu_i).sum(-1)  # (R, *b, K): eps_i.mu_c
        cross = eps @ mu.transpose(-1, -2)  # (R, *b, K, C): eps_i.mu_c'
        gap = (mu.unsqueeze(-2) - mu.unsqueeze(-3)).square().sum(-1)  # (*b, C, C): |mu_c - mu_c'|^2
        gap = gap.repeat_interleave(per, dim=-2)  # (*b, K, C)
        log_q = (cross - own.unsqueeze(-1)).div_(sigma).sub_(gap / (2 * sigma**2))
        log_mixture = torch.logsumexp(log_q, dim=-1)  # (R, *b, K)
        # log w_{n,i} - omega_i.x_n with the sample's own proposal q_c:
        # log_mass + log N(omega_i; 0, I) - log q_c(omega_i), constants shared by every sample dropped
        common = log_mass - 0.5 * (mu_i * mu_i).sum(-1) - sigma * own + 0.5 * (1 - sigma**2) * (eps * eps).sum(-1)
        logits = inp.x @ omega.transpose(-1, -2)  # (R, *b, N, K)
        if self.weights == "balance":
            logits += (common - log_mixture).unsqueeze(-2)
        else:
            t = torch.softmax(x_bar @ inp.x.transpose(-1, -2), dim=-1)  # (*b, C, N), over the queries
            centred = (t - t.mean(-2, keepdim=True)).transpose(-1, -2).repeat_interleave(per, dim=-1)  # (*b, N, K)
            mis = torch.exp(-log_mixture).unsqueeze(-2) + self.alpha * centred  # BH_c(omega_i) + alpha (t - mean t)
            logits += common.unsqueeze(-2) + mis.clamp_(min=self.alpha_floor).log_()
        return (torch.softmax(logits, dim=-1) @ f).to(inp.out_dtype)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """Counted as the code runs it, with K = C S' samples (S' = 2 S_c when antithetic).

        Matrix products per replicate: omega.y_m (2 K M d), f (2 K M dv), eps.mu_c' (2 K C d), omega.x_n (2 N K d)
        and the output mix (2 N K dv); deterministic, for weights="optimal" only: xbar_c.x_n (2 C N d).
        Elementwise, added on top: the segment means ((N + M) d, or N d for the optimal weights' xbar alone)
        and |mu_c - mu_c'|^2 (3 C^2 d) once per call; per replicate the samples and their norms (6 K d), the
        key-side log-sum-exp and softmax (5 K M), the mixture density (6 K C) and the output softmax (5 N K);
        the optimal weights add t's softmax and centring (6 N C) and the clamped log alpha (4 N K).
        Memory: the K x M key logits, the N x K query logits and the proposal matrices, per replicate.
        """
        C = self.num_segments(N)
        K = C * self.samples_per_proposal * (2 if self.antithetic else 1)
        optimal = self.weights == "optimal"
        fixed = 3 * C * C * d + ((N + M) * d if self.proposal == "mean" else N * d if optimal else 0)
        rep = 2 * K * (M + N) * (d + dv) + 2 * K * C * d + 6 * K * d + 5 * K * M + 6 * K * C + 5 * N * K
        if optimal:
            fixed += 2 * C * N * d + 6 * N * C
            rep += 4 * N * K
        memory_fixed = C * C * d + (2 * C * N if optimal else 0)
        memory = 2 * K * M + 2 * N * K + 2 * K * C + K * (2 * d + dv) + N * dv
        return Cost.per_element(fixed, rep, memory_fixed, memory, batch=batch, itemsize=itemsize)


def segment_means(t: torch.Tensor, count: int) -> torch.Tensor:
    """Means of ``count`` contiguous segments of the positions, (*b, N, e) -> (*b, count, e), count <= N.

    The reference code's split: segments of L = N // count positions; when count does not divide N, the first
    (L + 1) count - N segments hold L positions and the others L + 1.
    """
    N = t.shape[-2]
    L = N // count
    short = (L + 1) * count - N if N % count else count
    head = t[..., : short * L, :].unflatten(-2, (short, L)).mean(-2)
    if short == count:
        return head
    tail = t[..., short * L :, :].unflatten(-2, (count - short, L + 1)).mean(-2)
    return torch.cat([head, tail], dim=-2)
