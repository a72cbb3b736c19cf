"""TopK: softmax attention restricted to each query's ``top_k`` largest logits (deterministic, no noise).

An example of an estimator defined outside evalab: it follows evalab's estimator protocol (docs/estimators.md)
using public names only, and is announced to evalab by the ``evalab.estimators`` entry point in pyproject.toml.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import evalab as ev

__all__ = ["TopK"]


@dataclass(frozen=True)
class TopK:
    """Softmax over the ``top_k`` largest logits of each query (all of them when top_k >= M).

    Call: est(q, k, v, draw) with q (*b, N, d), k (*b, M, d), v (*b, M, dv) -> (R, *b, N, dv); the draw is empty.
    """

    top_k: int = 8
    scale: float | None = None

    noise_kind = "none"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        return (0,)

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> ev.Draw:
        """Deterministic: an empty draw (R, 0)."""
        return ev.Draw(torch.zeros(replicates, 0, dtype=torch.float64), self.noise_kind)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: ev.Draw) -> torch.Tensor:
        draw.as_tensor(self.noise_layout(q, k), self.noise_kind, device=q.device, dtype=torch.float64)  # refuse others
        out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        ct = torch.float64 if out_dtype == torch.float64 else torch.float32  # half inputs computed in float32
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        logits = scale * q.to(ct) @ k.to(ct).transpose(-1, -2)                    # (*b, N, M)
        top, index = logits.topk(min(self.top_k, k.shape[-2]), dim=-1)          # (*b, N, K)
        values = v.to(ct).unsqueeze(-3).expand(*logits.shape, v.shape[-1])       # a view: (*b, N, M, dv)
        chosen = values.gather(-2, index.unsqueeze(-1).expand(*index.shape, v.shape[-1]))  # (*b, N, K, dv)
        out = (torch.softmax(top, dim=-1).unsqueeze(-2) @ chosen).squeeze(-2)    # (*b, N, dv)
        return out.to(out_dtype).expand(draw.replicates, *out.shape)

    def cost(self, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> ev.Cost:
        """All deterministic: the logits (2 N M d), the top-k selection (N M comparisons), the softmax over
        K = min(top_k, M) logits (4 N K) and the weighted sum (2 N K dv); memory: the logits and chosen values."""
        K = min(self.top_k, M)
        flops = 2 * N * M * d + N * M + 4 * N * K + 2 * N * K * dv
        return ev.Cost.per_element(flops, 0.0, N * M + N * K * dv + N * dv, 0.0, batch=batch, itemsize=itemsize)
