"""Learned feature maps as estimators: T2R, Hedgehog and ReBased (docs/theory.md, "Feature maps and window hybrids"), with
separate parameters for queries and keys, per head, and the exact-window hybrid of evalab.estimators.linear
(LoLCATs is Hedgehog with a sliding window).

Parameters are tensor fields: weights (*heads, r, d), biases (*heads, r) and the hybrid's gamma (*heads). Their
leading axes ``heads`` broadcast against the batch axes of q (*b, N, d), aligned on the right: weights (H, r, d)
serve q (..., H, N, d), one set per head; heads = () shares one set across every batch element. Fitting
replaces them: ``dataclasses.replace(est, **{name: tensor})`` for the names in ``learnable_fields`` gives the
estimator with new parameters, and a call is a pure function differentiable in them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import _checks
from . import feature_maps
from .draw import seeded_generator
from .linear import FeatureAttention, with_guard

#: Initialisations: "identity" (W = I on the leading min(r, d) diagonal, b = 0: the Hedgehog release and
#: flash-linear-attention's HedgehogFeatureMap), "uniform" (W ~ U(-d^-1/2, d^-1/2), b = 0: torch's nn.Linear
#: default, flash-linear-attention's T2RFeatureMap, which has no bias).
INITS = ("identity", "uniform")
INIT_PURPOSE = 0x6C6D6170  # "lmap": the seed stream of random initialisations


def _heads(value) -> tuple[int, ...]:
    """heads as a tuple of ints >= 1 (an int H is (H,))."""
    heads = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(heads, (tuple, list)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                                       for h in heads):
        raise ValueError(f"heads={value!r} must be an int >= 1 or a tuple of them (the parameters' leading axes)")
    return tuple(heads)


@dataclass(frozen=True, eq=False)
class LearnedMap(FeatureAttention):
    """Shared fields and checks of the learned maps (T2R, Hedgehog): ``feature_dim`` r outputs of W x + b for
    head size ``d``, parameters with leading axes ``heads``, initialised by ``init`` (random ones from ``seed``)
    where not given; the window hybrid's fields as in LinearAttention, gamma a tensor (*heads) (0: g = 1/2).

    Equality is identity (the fields hold tensors); the parameters are left out of the repr.
    """

    d: int = 64
    feature_dim: int = 64
    heads: tuple[int, ...] = ()
    causal: bool = False
    scale: float | None = None
    init: str = "identity"
    seed: int = 0
    window: int = 0
    window_kind: str = "sliding"
    shift: str = "none"
    affine: bool = True
    q_weight: torch.Tensor | None = field(default=None, repr=False)
    q_bias: torch.Tensor | None = field(default=None, repr=False)
    k_weight: torch.Tensor | None = field(default=None, repr=False)
    k_bias: torch.Tensor | None = field(default=None, repr=False)
    gamma: torch.Tensor | None = field(default=None, repr=False)

    learnable_fields: ClassVar[tuple[str, ...]] = ("q_weight", "q_bias", "k_weight", "k_bias", "gamma")

    def __post_init__(self) -> None:
        _checks.integer("d", self.d)
        _checks.integer("feature_dim", self.feature_dim)
        object.__setattr__(self, "heads", _heads(self.heads))
        _checks.choice("init", self.init, INITS)
        _checks.integer("seed", self.seed, minimum=0)
        initial = self.initial_parameters()
        for name, value in initial.items():
            given = getattr(self, name)
            if given is None:
                object.__setattr__(self, name, value)
            elif not isinstance(given, torch.Tensor) or not given.is_floating_point():
                raise TypeError(f"{name} must be a floating torch.Tensor of shape {tuple(value.shape)}, got "
                                f"{type(given).__name__}")
            elif given.shape != value.shape:
                raise ValueError(f"{name} has shape {tuple(given.shape)}, expected {tuple(value.shape)} (heads "
                                 f"{self.heads}, feature_dim {self.feature_dim}, d {self.d})")
        self._check_window_fields()

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The initialisation ``init`` gives (float32, CPU): {name: tensor} for every learnable field."""
        shape = (*self.heads, self.feature_dim, self.d)
        if self.init == "identity":
            weights = [torch.eye(self.feature_dim, self.d).expand(shape).clone() for _ in range(2)]
        else:
            g = seeded_generator(self.seed, INIT_PURPOSE)
            bound = 1 / math.sqrt(self.d)
            weights = [(torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float() for _ in range(2)]
        bias = torch.zeros(*self.heads, self.feature_dim)
        return {"q_weight": weights[0], "q_bias": bias, "k_weight": weights[1], "k_bias": bias.clone(),
                "gamma": torch.zeros(self.heads)}

    @classmethod
    def initialised(cls, *, layers: int | None = None, heads: int | None = None, **options) -> "LearnedMap":
        """An estimator with parameters per (layer, head): heads (layers, heads), (heads,) or () as given."""
        lead = tuple(n for n in (layers, heads) if n is not None)
        return cls(heads=lead, **options)

    def parameters(self) -> dict[str, torch.Tensor]:
        """{name: tensor} for the names in ``learnable_fields``."""
        return {name: getattr(self, name) for name in self.learnable_fields}

    def select(self, index) -> "LearnedMap":
        """The estimator with every parameter indexed on its leading axes (e.g. ``select((layer, head))``)."""
        index = index if isinstance(index, tuple) else (index,)
        picked = {name: t[index] for name, t in self.parameters().items()}
        return dataclasses.replace(self, heads=tuple(picked["gamma"].shape), **picked)

    def _weights(self, like: torch.Tensor) -> list[torch.Tensor]:
        """q_weight, q_bias, k_weight, k_bias in ``like``'s dtype and device; ``like`` (*b, L, d) must have d = self.d."""
        if like.shape[-1] != self.d:
            raise ValueError(f"q and k have head size {like.shape[-1]}, but {type(self).__name__} has d={self.d}")
        batch = tuple(like.shape[:-2])
        try:
            fits = tuple(torch.broadcast_shapes(self.heads, batch)) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"the parameters' leading axes heads={self.heads} must broadcast against q's batch axes "
                             f"{batch} without enlarging them")
        tensors = (self.q_weight, self.q_bias, self.k_weight, self.k_bias)
        return [t.to(device=like.device, dtype=like.dtype) for t in tensors]

    def map_flops(self, N: int, M: int, d: int) -> tuple[float, float]:
        """The projections W x (2 (N + M) r d, matrix products) and ELEMENTWISE_PER_FEATURE per feature."""
        return 2 * (N + M) * self.feature_dim * d, self.elementwise_per_feature * (N + M) * self.columns(d)


@dataclass(frozen=True, eq=False)
class T2R(LearnedMap):
    """T2R (Kasai et al. 2021): phi(x) = relu(W_q x + b_q), psi(y) = relu(W_k y + b_k), r = ``feature_dim``
    features plus the guard column. Released initialisation: ``init="uniform"`` (flash-linear-attention's
    T2RFeatureMap, torch's nn.Linear default; no bias there, b = 0 here).

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    init: str = "uniform"

    elementwise_per_feature: ClassVar[int] = 2  # bias, relu

    @classmethod
    def _check_instances(cls) -> list:
        return [cls(d=8, feature_dim=6, causal=c) for c in (False, True)] + [
            cls(d=8, feature_dim=6, window=8, window_kind="sliding", causal=True, shift="row_max", affine=False)]

    def columns(self, d: int) -> int:
        """r + 1: the features and the guard column."""
        return self.feature_dim + 1

    def feature_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wq, bq, wk, bk = self._weights(x)
        return with_guard(feature_maps.t2r(x, wq, bq)), with_guard(feature_maps.t2r(y, wk, bk))


@dataclass(frozen=True, eq=False)
class Hedgehog(LearnedMap):
    """Hedgehog (Zhang et al. 2024) with u = W x + b and 2r features, ``variant`` as in
    evalab.estimators.feature_maps: "softmax" ([softmax(u), softmax(-u)], LoLCATs' softmax_dim), "joint_softmax"
    (softmax([2u, -2u]), flash-linear-attention's HedgehogFeatureMap), "exp" ([exp(u), exp(-u)], the paper's
    formula). Released initialisation: ``init="identity"`` (W = I, b = 0). LoLCATs is
    ``Hedgehog(window=64, window_kind="sliding", causal=True, shift="row_max", affine=False)``.

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    variant: str = "softmax"

    elementwise_per_feature: ClassVar[int] = 5  # bias, negate, exp, sum, divide

    def __post_init__(self) -> None:
        _checks.choice("variant", self.variant, feature_maps.HEDGEHOG_VARIANTS)
        super().__post_init__()

    @classmethod
    def _check_instances(cls) -> list:
        return [cls(d=8, feature_dim=6, variant="softmax"),
                cls(d=8, feature_dim=6, variant="joint_softmax", causal=True),
                cls(d=8, feature_dim=6, variant="exp"),
                cls(d=8, feature_dim=8, window=8, window_kind="block", causal=True)]

    def columns(self, d: int) -> int:
        """2 r."""
        return 2 * self.feature_dim

    def feature_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wq, bq, wk, bk = self._weights(x)
        return (feature_maps.hedgehog(x, wq, bq, self.variant),
                feature_maps.hedgehog(y, wk, bk, self.variant, keys=True))


@dataclass(frozen=True, eq=False)
class ReBased(LearnedMap):
    """ReBased (Aksenov et al. 2024): a layer norm with learned ``q_weight``, ``q_bias`` (queries) and ``k_weight``,
    ``k_bias`` (keys), each (*heads, d), then the quadratic kernel (z_x.z_y)^2 / d over d (d + 1) / 2 features plus
    the guard column. feature_dim is d (None: d). Released initialisation: weight 1, bias 0 (``init="identity"``,
    flash-linear-attention's RebasedFeatureMap; its layer norm's epsilon 1e-5).

    Call: est(q, k, v, draw) -> (R, *b, N, dv), every replicate the same; draw noise (R, 0).
    """

    feature_dim: int | None = None

    def __post_init__(self) -> None:
        if self.feature_dim is None:
            object.__setattr__(self, "feature_dim", self.d)
        if self.feature_dim != self.d or self.init != "identity":
            raise ValueError(f"ReBased's layer norm has feature_dim = d and init='identity', got "
                             f"feature_dim={self.feature_dim}, d={self.d}, init={self.init!r}")
        super().__post_init__()

    @classmethod
    def _check_instances(cls) -> list:
        return [cls(d=8), cls(d=8, causal=True, window=8, window_kind="sliding")]

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Layer-norm weights 1 and biases 0 (*heads, d), gamma 0 (*heads)."""
        ones, zeros = torch.ones(*self.heads, self.d), torch.zeros(*self.heads, self.d)
        return {"q_weight": ones, "q_bias": zeros, "k_weight": ones.clone(), "k_bias": zeros.clone(),
                "gamma": torch.zeros(self.heads)}

    def columns(self, d: int) -> int:
        """d (d + 1) / 2 + 1: the features and the guard column."""
        return d * (d + 1) // 2 + 1

    def feature_pair(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wq, bq, wk, bk = self._weights(x)
        return with_guard(feature_maps.rebased(x, wq, bq)), with_guard(feature_maps.rebased(y, wk, bk))

    def map_flops(self, N: int, M: int, d: int) -> tuple[float, float]:
        """No matrix product; the layer norm and its affine map (8 per input entry) and 3 per feature."""
        return 0.0, (N + M) * (8 * d + 3 * self.columns(d))
