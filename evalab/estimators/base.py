"""The estimator protocol every evalab estimator follows (built-in or a user's own), and the Cost it reports.

An estimator is an object with four members (hyper-parameters fixed at construction; a frozen dataclass is
the natural form, so that ``dataclasses.replace`` gives variants and sweeps see its fields as columns):

- ``noise_kind``: a string naming what its noise is (``"omega:iid"``, ``"eps"``, ``"none"``); estimators whose
  draws share kind and layout share draws (common random numbers).
- ``noise_layout(q, k)``: the shape of one replicate's noise, a tuple (``(0,)`` for deterministic estimators).
- ``draw(q, k, *, replicates, generator)``: a :class:`~evalab.Draw` holding noise ``(R, *noise_layout)``,
  sampled only from ``generator`` (a torch.Generator, an int seed or None), never from a global state.
- ``__call__(q, k, v, draw)``: a pure function of its arguments; q (*b, N, d), k (*b, M, d), v (*b, M, dv)
  -> (R, *b, N, dv).

Optionally ``cost(*, N, M, d, dv, batch=1, itemsize=4)`` returns a :class:`Cost`, the FLOPs and memory of one
call; ``evalab.estimate_cost`` and every cost column use it (NaN FLOPs without it). Two optional members say
where the estimator must be right: ``exact_limit(N, M)``, the variant of itself that computes exact softmax
attention on N queries and M keys (or None), and ``budget``, the name of the int parameter along which it
converges to softmax attention (num_features, samples_per_query, ...).
``evalab.testing.check_estimator`` checks all of this on a concrete estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .draw import Draw


@runtime_checkable
class Estimator(Protocol):
    """An estimator of softmax attention: see the module docstring for the contract."""

    @property
    def noise_kind(self) -> str: ...

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]: ...

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw: ...

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draw: Draw) -> torch.Tensor: ...


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one call: ``fixed_*`` once per call, ``replicate_*`` per replicate (batch dims included).

    Counting rule: a multiply-add is 2 FLOPs, every other elementwise operation on a large tensor (exp, add,
    divide, max) 1 FLOP. Memory is the peak working set, inputs excluded.
    """

    fixed_flops: float
    replicate_flops: float
    fixed_bytes: float
    replicate_bytes: float

    @classmethod
    def per_element(cls, fixed_flops: float, replicate_flops: float, fixed_elements: float, replicate_elements: float,
                    *, batch: int = 1, itemsize: int = 4) -> "Cost":
        """A Cost from one batch element's FLOPs and working-memory element counts, scaled to ``batch``
        elements of ``itemsize`` bytes."""
        return cls(batch * fixed_flops, batch * replicate_flops, batch * itemsize * fixed_elements,
                   batch * itemsize * replicate_elements)

    def flops(self, replicates: int = 1) -> float:
        """FLOPs of one call producing ``replicates`` estimates."""
        return self.fixed_flops + replicates * self.replicate_flops

    def bytes(self, replicates: int = 1) -> float:
        """Peak working memory (bytes) of one call producing ``replicates`` estimates, inputs excluded."""
        return self.fixed_bytes + replicates * self.replicate_bytes

    def as_dict(self) -> dict[str, float]:
        """Columns for result tables: flops and bytes per replicate (the deterministic part amortised once)."""
        return {"flops": self.fixed_flops + self.replicate_flops, "peak_bytes": self.fixed_bytes + self.replicate_bytes}
