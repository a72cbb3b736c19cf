"""FeatureMapAttention: any feature map, an ``nn.Module`` or a plain callable trained elsewhere (e.g. one of
flash-linear-attention's ``fla.modules.feature_map`` modules), measured as an evalab estimator: linear attention
through it, optionally beside an exact window (the hybrid of evalab.estimators.linear).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import _checks
from .linear import FeatureAttention, with_guard

#: What the map is applied to: q and k as given ("raw", flash-linear-attention's convention: its
#: TaylorFeatureMap divides by d^1/4 itself; a non-default ``scale`` s rescales them by sqrt(s / d**-0.5), so the
#: map sees the inputs that give the same logits at the default scale), or evalab's scaled coordinates
#: x = sqrt(scale) q ("scaled").
INPUTS = ("raw", "scaled")


@dataclass(frozen=True, eq=False)
class FeatureMapAttention(FeatureAttention):
    """Linear attention with the query map ``phi`` and key map ``psi`` (default: phi), callables taking
    (*b, L, d) to (*b, L, F) features whose inner products are non-negative; ``inputs`` "raw" | "scaled" says
    what they see. ``guard`` appends the constant column of maps that can vanish for every key (relu-like).
    A map with parameters runs in its parameters' dtype and device (the features are then brought to the
    compute dtype); everything else follows LinearAttention (window, window_kind, gamma, shift, affine).

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    Equality is identity (the fields hold modules).
    """

    phi: Callable[[torch.Tensor], torch.Tensor] = field(default=None, repr=False)
    psi: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    inputs: str = "raw"
    guard: bool = False
    causal: bool = False
    scale: float | None = None
    window: int = 0
    window_kind: str = "sliding"
    gamma: float | torch.Tensor = 0.0
    shift: str = "none"
    affine: bool = True

    learnable_fields: ClassVar[tuple[str, ...]] = ("gamma",)

    def __post_init__(self) -> None:
        for name in ("phi", "psi"):
            value = getattr(self, name)
            if not callable(value) and not (name == "psi" and value is None):
                raise TypeError(f"{name} must be a callable feature map (an nn.Module or a function), got {value!r}")
        _checks.choice("inputs", self.inputs, INPUTS)
        _checks.boolean("guard", self.guard)
        self._check_window_fields()

    def _apply(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn on x, in the dtype and device of fn's parameters when it has any; features in x's dtype/device."""
        params = next(iter(fn.parameters()), None) if isinstance(fn, torch.nn.Module) else None
        inp = x if params is None else x.to(device=params.device, dtype=params.dtype)
        out = fn(inp).to(device=x.device, dtype=x.dtype)
        return with_guard(out) if self.guard else out

    def feature_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs == "raw":  # the map sees q and k in the units of the default scale d**-0.5: q and k
            root = x.shape[-1] ** -0.25  # themselves at that scale, rescaled by sqrt(scale / d**-0.5) at another
            x, y = x / root, y / root
        return self._apply(self.phi, x), self._apply(self.psi or self.phi, y)

    def _probe(self, d: int) -> tuple[int, int, int]:
        """(features F, matrix-product FLOPs of phi on one row, of psi on one row), measured by torch's counter."""
        x = torch.zeros(1, d)
        flops = []
        for fn in (self.phi, self.psi or self.phi):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                F = self._apply(fn, x).shape[-1]
            flops.append(counter.get_total_flops())
        return F, flops[0], flops[1]

    def columns(self, d: int) -> int:
        """Features F (the guard column included), found by calling phi on one row."""
        return self._probe(d)[0]

    def map_flops(self, N: int, M: int, d: int) -> tuple[float, float]:
        """The maps' matrix products, counted by torch's FLOP counter on one row and scaled to N (phi) and M (psi)
        rows; 3 elementwise per feature."""
        F, phi_flops, psi_flops = self._probe(d)
        return N * phi_flops + M * psi_flops, 3 * (N + M) * F
