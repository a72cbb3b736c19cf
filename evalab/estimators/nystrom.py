"""Nystromformer: a deterministic low-rank approximation of softmax attention through m landmarks
(docs/theory.md section 11).

  Y_hat = A1 Z (A3 V),   A1 = softmax_row(X Yl^T) (N x m),  A2 = softmax_row(Xl Yl^T) (m x m),
                         A3 = softmax_row(Xl Y^T) (m x M),  Z ~ pinv(A2),

with landmarks Xl, Yl the means of x and y over m contiguous segments (scaled coordinates x = sqrt(scale) q).
Z is the reference code's iterative pseudo-inverse or, to separate the Nystrom error from the iteration's, the
exact one. Nothing is random: the draw is empty and the Monte-Carlo variance 0. Rows of the implied matrix
A1 Z A3 can have negative entries, so it is not a distribution (the row KL/TV metrics are skipped).

Departures from the reference code (mlpen/Nystromformer): the default initialisation of the pseudo-inverse
iteration is per head (the reference's is over the whole batch; init="original" reproduces it); no shortcut to
exact softmax when m = N (the Nystrom path always runs); no depthwise-convolution skip on V (a learned part, not the approximation); the product is
ordered A1 (Z (A3 V)), cheaper than the reference's (A1 Z)(A3 V) and equal in exact arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import _checks
from .base import Cost
from .draw import Draw, NoDraws
from .scaled import Scaled

PINVS = ("iterative", "exact")
INITS = ("exact", "original")


def segment_means(t: torch.Tensor, m: int) -> torch.Tensor:
    """Means of t (*b, L, e) over m contiguous segments: (*b, m, e). When m does not divide L, the first
    (L // m + 1) m - L segments hold L // m positions and the rest one more."""
    L = t.shape[-2]
    short, size = (L // m + 1) * m - L, L // m
    split = short * size
    parts = [t[..., :split, :].unflatten(-2, (short, size)).mean(-2)] if short else []
    if short < m:
        parts.append(t[..., split:, :].unflatten(-2, (m - short, size + 1)).mean(-2))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def iterative_pinv(a: torch.Tensor, iterations: int, init: str) -> torch.Tensor:
    """The reference code's iterative pseudo-inverse of row-stochastic a (*b, m, m):

      Z_{j+1} = 1/4 Z_j (13 I - a Z_j (15 I - a Z_j (7 I - a Z_j))),   I - a Z_{j+1} = 1/4 E^3 (3 I + E), E = I - a Z_j,

    from Z_0 = a^T / (||a||_1 ||a||_inf). init "exact": per batch element, ||a||_1 ||a||_inf (the reference's
    recommended option and the T2T-ViT copy's default); "original": the reference's default, a^T divided by the
    largest column sum over the whole batch (every batch element and head; ||a||_inf = 1 for row-stochastic a),
    which makes each head's output depend on the other heads.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    column_sums = a.sum(-2)  # (*b, m)
    if init == "original":
        norm = column_sums.max()
    else:
        norm = (column_sums.amax(-1) * a.sum(-1).amax(-1))[..., None, None]
    z = a.transpose(-1, -2) / norm
    for _ in range(iterations):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@dataclass(frozen=True)
class Nystrom(NoDraws):
    """Nystromformer with ``num_landmarks`` = m segment-mean landmarks (non-causal, deterministic).

    pinv: iterative (the reference's, ``pinv_iterations`` steps from ``init`` = exact | original, see
    :func:`iterative_pinv`) | exact (torch.linalg.pinv in float64). Needs m <= N and m <= M. The default init is
    the per-head "exact" one: "original" (the reference code's default) couples the batch elements, so a batched
    call no longer equals the per-head calls.
    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    num_landmarks: int = 32
    pinv: str = "iterative"
    pinv_iterations: int = 6
    init: str = "exact"
    causal: bool = False
    scale: float | None = None

    def exact_limit(self, N: int, M: int):
        """Exact when every query is a landmark (M a multiple of N) and the pseudo-inverse is exact (evalab.testing)."""
        return replace(self, num_landmarks=N, pinv="exact") if M % N == 0 else None


    def __post_init__(self) -> None:
        _checks.integer("num_landmarks", self.num_landmarks)
        _checks.choice("pinv", self.pinv, PINVS)
        _checks.integer("pinv_iterations", self.pinv_iterations, minimum=0)
        _checks.choice("init", self.init, INITS)
        _checks.real("scale", self.scale, allow_none=True, strict=True)
        if self.causal:
            raise ValueError("Nystrom is non-causal (its landmarks average over future positions); got causal=True")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale)
        draw.for_estimator(self, q, k, inp.x)  # refuses another estimator's draw
        m = self.num_landmarks
        if m > min(q.shape[-2], k.shape[-2]):
            raise ValueError(f"num_landmarks={m} must be at most N={q.shape[-2]} and M={k.shape[-2]}")
        xl, yl = segment_means(inp.x, m), segment_means(inp.y, m)
        a1 = torch.softmax(inp.x @ yl.transpose(-1, -2), dim=-1)  # (*b, N, m)
        a2 = torch.softmax(xl @ yl.transpose(-1, -2), dim=-1)  # (*b, m, m)
        a3 = torch.softmax(xl @ inp.y.transpose(-1, -2), dim=-1)  # (*b, m, M)
        if self.pinv == "exact":
            z = torch.linalg.pinv(a2.to(torch.float64)).to(a2.dtype)
        else:
            z = iterative_pinv(a2, self.pinv_iterations, self.init)
        out = a1 @ (z @ (a3 @ inp.v))
        return out.to(inp.out_dtype).expand(draw.replicates, *out.shape)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """All deterministic (once per call). Matrix products as performed: the logits of A1, A2, A3
        (2 m (N + M) d + 2 m^2 d), the iterative pseudo-inverse (4 m x m products per step, 8 m^3 each step) and
        the output A1 (Z (A3 V)) (2 m M dv + 2 m^2 dv + 2 N m dv). The exact pinv is counted as its SVD,
        about 22 m^3, plus the 2 m^3 of V diag(1/s) U^T. Elementwise terms added: segment sums and
        divisions ((N + M) d + 2 m d), 4 per softmax element (max, subtract-exp, sum, divide:
        4 m (N + M + m)), and per pinv step the four m x m subtractions/scalings (4 m^2), plus 2 m^2 for the
        initial scaling. Memory: A1, A3, the m x m temporaries and the output."""
        m = min(self.num_landmarks, N, M)
        flops = 2 * m * (N + M) * d + 2 * m * m * d
        flops += 2 * m * M * dv + 2 * m * m * dv + 2 * N * m * dv
        flops += (N + M) * d + 2 * m * d + 4 * m * (N + M + m)
        if self.pinv == "exact":
            flops += 24 * m**3
        else:
            flops += self.pinv_iterations * (8 * m**3 + 4 * m * m) + 2 * m * m
        memory = N * m + m * M + 5 * m * m + m * dv + N * dv
        return Cost.per_element(flops, 0.0, memory, 0.0, batch=batch, itemsize=itemsize)
