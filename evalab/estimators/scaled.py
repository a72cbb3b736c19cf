"""Scaled: one estimator call's inputs, checked, converted to the compute dtype and put in scaled coordinates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

from .. import _checks


@dataclass(frozen=True)
class Scaled:
    """x = sqrt(scale) q (*b, N, d), y = sqrt(scale) k (*b, M, d), v (*b, M, dv) in the compute dtype (float64
    if any input is float64, float32 otherwise), and the dtype results are returned in."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    out_dtype: torch.dtype

    @classmethod
    def of(cls, q, k, v, scale: float | None, *, causal: bool = False) -> "Scaled":
        """Check q, k, v (TypeError/ValueError naming the argument) and scale them."""
        _checks.qkv(q, k, v, causal=causal)
        ct = _checks.compute_dtype(q, k, v)
        root = math.sqrt(_checks.resolve_scale(scale, q.shape[-1]))
        out_dtype = reduce(torch.promote_types, (q.dtype, k.dtype, v.dtype))
        return cls(q.to(ct) * root, k.to(ct) * root, v.to(ct), out_dtype)

    @property
    def inplace(self) -> bool:
        """Whether the estimator may overwrite its intermediates: True unless autograd records this call (grad
        mode on and x, y or v requiring a gradient). Both paths give identical numbers; the in-place one saves
        memory."""
        return not records_grad(self.x, self.y, self.v)


def records_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd records operations on ``tensors``: grad mode is on and one of them requires a gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
