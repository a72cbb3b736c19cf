"""A small learned estimator for the fitting tests, written against the learned-estimator contract only (a
frozen dataclass, tensor fields named by ``learnable_fields``, leading head axes that broadcast against q's
batch axes): non-causal linear attention with Hedgehog-style features phi(x) = [softmax(W x + b),
softmax(-(W x + b))], one (W, b) for queries and one for keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import evalab as ev
from evalab.estimators.draw import NoDraws
from evalab.estimators.scaled import Scaled


@dataclass(frozen=True)
class SoftmaxFeatures(NoDraws):
    """wq, wk (*heads, F, d); bq, bk (*heads, F); identity-like W and zero b by default."""

    d: int = 8
    num_features: int = 8
    scale: float | None = None
    wq: torch.Tensor | None = None
    bq: torch.Tensor | None = None
    wk: torch.Tensor | None = None
    bk: torch.Tensor | None = None

    learnable_fields: ClassVar[tuple[str, ...]] = ("wq", "bq", "wk", "bk")

    def __post_init__(self) -> None:
        eye = torch.eye(self.num_features, self.d, dtype=torch.float64)
        for name, init in (("wq", eye), ("wk", eye), ("bq", torch.zeros(self.num_features, dtype=torch.float64)),
                           ("bk", torch.zeros(self.num_features, dtype=torch.float64))):
            if getattr(self, name) is None:
                object.__setattr__(self, name, init)

    @staticmethod
    def _phi(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = x @ w.to(x.dtype).transpose(-1, -2) + b.to(x.dtype).unsqueeze(-2)
        return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1)

    def __call__(self, q, k, v, draw):
        inp = Scaled.of(q, k, v, self.scale)
        draw.for_estimator(self, q, k, inp.x)
        qf, kf = self._phi(inp.x, self.wq, self.bq), self._phi(inp.y, self.wk, self.bk)
        num = qf @ (kf.transpose(-1, -2) @ inp.v)
        den = qf @ kf.sum(-2).unsqueeze(-1)
        out = (num / den).to(inp.out_dtype)
        return out.expand(draw.replicates, *out.shape)

    def cost(self, *, N, M, d, dv, batch=1, itemsize=4):
        F = 2 * self.num_features
        flops = 2 * (N + M) * self.num_features * d + 6 * (N + M) * F + 2 * M * F * dv + 2 * N * F * (dv + 1) + N * dv
        return ev.Cost.per_element(flops, 0.0, (N + M) * F + F * dv + N * dv, 0.0, batch=batch, itemsize=itemsize)
