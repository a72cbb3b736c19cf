"""QKV: one attention workload (queries, keys, values and the logit scale the model applies)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class QKV:
    """q (*b, N, d), k (*b, M, d), v (*b, M, dv) and the logit scale; ``info`` describes where they came from.

    Unpacks as ``q, k, v = qkv``; pass ``scale=qkv.scale`` to estimators.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    info: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.q, self.k, self.v))

    def to(self, device=None, dtype=None) -> "QKV":
        """The same workload on another device/dtype."""
        move = lambda t: t.to(device=device, dtype=dtype)
        return QKV(move(self.q), move(self.k), move(self.v), self.scale, dict(self.info))

    def __repr__(self) -> str:
        described = ", ".join(f"{key}={value!r}" for key, value in self.info.items() if key != "scale")
        return f"QKV(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, v={tuple(self.v.shape)}, scale={self.scale:.4g}, {described})"
