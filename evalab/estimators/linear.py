"""Linear attention with a fixed feature map (docs/theory.md section 13): deterministic, and NOT an estimator
of softmax attention. Its kernel phi(x).phi(y) is a different similarity from exp(x.y), so the gap it leaves
does not shrink with any budget; it is the baseline every random method must beat.

  Y_n = sum_m phi(x_n).phi(y_m) v_m / sum_m phi(x_n).phi(y_m)       (causal: m <= n)

on scaled coordinates x = sqrt(scale) q, y = sqrt(scale) k, with phi(x) = elu(x) + 1 (Katharopoulos et al.
2020) or relu(x). relu features can meet no key at all (phi(x_n).phi(y_m) = 0 for every m); the kernel is then
taken as relu(x).relu(y) + RELU_EPS (one constant feature column sqrt(RELU_EPS) on both sides), so such a query
attends uniformly over its keys instead of dividing 0 by 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from .base import Cost, NoDraws
from .draw import Draw
from .rfa import CAUSAL_BLOCK, _causal_linear, _linear
from .scaled import Scaled

FEATURES = ("elu", "relu")
#: The constant added to the relu kernel (see the module docstring).
RELU_EPS = 1e-6


@dataclass(frozen=True)
class LinearAttention(NoDraws):
    """Linear attention with ``feature`` = elu (elu(x) + 1) | relu; deterministic.

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    feature: str = "elu"
    causal: bool = False
    scale: float | None = None


    def __post_init__(self) -> None:
        _checks.choice("feature", self.feature, FEATURES)
        _checks.real("scale", self.scale, allow_none=True, strict=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) for scaled x (*b, L, d): (*b, L, d) (elu) or (*b, L, d + 1) (relu, with the eps column)."""
        if self.feature == "elu":
            return F.elu(x) + 1
        return torch.cat([torch.relu(x), torch.full_like(x[..., :1], math.sqrt(RELU_EPS))], dim=-1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor:
        inp = Scaled.of(q, k, v, self.scale, causal=self.causal)
        draw.for_estimator(self, q, k, inp.x)  # refuses another estimator's draw
        qf, kf = self.features(inp.x), self.features(inp.y)
        if self.causal:
            out = _causal_linear(qf, kf, inp.v)
        else:
            out = _linear(qf.unsqueeze(-2), kf.unsqueeze(-2), inp.v)[0]
        return out.to(inp.out_dtype).expand(draw.replicates, *out.shape)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
        """All deterministic, with F = d (elu) or d + 1 (relu) feature columns. Matrix products as performed:
        non-causal, sum_m phi(y_m) v_m^T (2 M F dv), the numerators (2 N F dv) and denominators (2 N F);
        causal, per block of t <= CAUSAL_BLOCK positions, the within-block kernel (2 t^2 F), its product with
        v (2 t^2 dv), the carried state's contribution (2 t F dv) and the state update (2 t F dv).
        Elementwise terms added: 3 per feature (elu, +1 or relu, copy) on N + M rows, the key sum (M F) and
        the division (N dv); causal, the mass update and query-mass product (3 t F) and the within-block row
        sums (t^2) per block. Memory: the features, the state and the output."""
        Fc = d if self.feature == "elu" else d + 1
        flops = 3 * (N + M) * Fc + N * dv
        if not self.causal:
            flops += 2 * M * Fc * dv + 2 * N * Fc * dv + 2 * N * Fc + M * Fc
            memory = (N + M) * Fc + Fc * dv + N * dv
            return Cost.per_element(flops, 0.0, memory, 0.0, batch=batch, itemsize=itemsize)
        for t in [CAUSAL_BLOCK] * (N // CAUSAL_BLOCK) + ([N % CAUSAL_BLOCK] if N % CAUSAL_BLOCK else []):
            flops += 2 * t * t * (Fc + dv) + 4 * t * Fc * dv + 3 * t * Fc + t * t
        T = min(CAUSAL_BLOCK, N)
        memory = (N + M) * Fc + T * T + Fc * dv + N * dv
        return Cost.per_element(flops, 0.0, memory, 0.0, batch=batch, itemsize=itemsize)
