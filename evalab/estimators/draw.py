"""Draw: the randomness of one estimator call, held apart from the estimator.

Estimators never touch a global random state: ``est.draw(q, k, replicates=R, generator=g)`` samples a
:class:`Draw`, and ``est(q, k, v, draw)`` is a pure function of its arguments. Estimators whose draws have the
same ``kind`` and shape can share one draw (common random numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks


@dataclass(frozen=True, eq=False)
class Draw:
    """Random noise for ``replicates`` independent estimates.

    noise: (R, ...) with the replicates leading. RFA and ControlVariates: omega itself, (R, S, d).
           EVA: eps, (R, C, S_c, d), added to each chunk's proposal mean. With ``shared_noise=False`` the
           estimator's batch axes follow R: (R, *b, S, d).
    kind:  what the noise is, e.g. ``"omega:iid"`` or ``"eps"``; estimators check it before use.
    """

    noise: torch.Tensor
    kind: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(self.noise).__name__}")
        if self.noise.dim() < 1:
            raise ValueError(f"noise must have a leading replicate dimension, got shape {tuple(self.noise.shape)}")
        if self.noise.is_floating_point() and self.noise.device.type != "meta":
            _checks.finite("noise", self.noise)

    @property
    def replicates(self) -> int:
        return self.noise.shape[0]

    def __repr__(self) -> str:
        """Kind, shape, dtype and device of the noise, never its values."""
        n = self.noise
        return f"Draw(kind={self.kind!r}, shape={tuple(n.shape)}, dtype={str(n.dtype).removeprefix('torch.')}, device={n.device})"

    def __getitem__(self, index: slice) -> "Draw":
        """Draw of a slice of the replicates: ``draw[10:20]``."""
        if not isinstance(index, slice):
            raise TypeError(f"index a Draw with a slice of replicates, got {index!r}")
        return Draw(self.noise[index], self.kind)

    def as_tensor(self, layout: tuple[int, ...], kind: str, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The noise checked against ``layout`` (shape without R) and ``kind``, moved to ``device``/``dtype``."""
        if tuple(self.noise.shape[1:]) != tuple(layout):
            raise ValueError(
                f"draw noise has shape {tuple(self.noise.shape)}, expected (replicates, {', '.join(map(str, layout))})"
            )
        if self.kind is not None and self.kind != kind:
            raise ValueError(f"draw holds {self.kind!r} noise, this estimator needs {kind!r}")
        return self.noise.to(device=device, dtype=dtype)

    def for_estimator(self, estimator, q: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The noise checked against ``estimator``'s layout for q, k and its noise kind, on ``like``'s device and
        dtype: the one way every estimator reads its draw."""
        return self.as_tensor(estimator.noise_layout(q, k), estimator.noise_kind, device=like.device, dtype=like.dtype)


def gaussian_noise(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise on the generator's device, sampled in float32 (torch's fast vectorised sampler)
    and returned as float64, so float32 and float64 estimates of the same draw see identical noise.

    On the CPU the numbers form one stream: consecutive calls of r and r' leading rows on one generator give the
    rows of one call of r + r' when each call holds a multiple of 16 numbers (torch fills 16 at a time); the
    Monte-Carlo engine draws noise blocks in such pieces when a whole block would not fit its memory budget."""
    return torch.randn(*shape, generator=generator, device=generator.device, dtype=torch.float32).double()


def seeded_generator(seed: int, *purpose: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` (default the CPU) for (seed, *purpose) through numpy's SeedSequence: the same seed
    used for different purposes (inputs, draws, noise blocks) gives unrelated streams.

    Reproducibility contract: the same (seed, purpose) on the same device type gives the same numbers (on CUDA,
    with the same torch version; torch's CUDA generator is not its CPU one, so CUDA noise differs from CPU noise,
    and CPU numbers are those of a CPU generator whatever device the estimates run on elsewhere). Noise drawn
    on the device needs no host-to-device copy."""
    state = np.random.SeedSequence([seed, *purpose]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=torch.device("cpu" if device is None else device)).manual_seed(
        int(state[0]) << 32 | int(state[1]))


def noise_batch(q: torch.Tensor, shared_noise: bool) -> tuple[int, ...]:
    """The batch axes a noise layout carries after R: none when one draw is shared by every batch element and
    head (``shared_noise=True``, Performer's convention), q's batch dimensions (*b) otherwise."""
    return () if shared_noise else tuple(q.shape[:-2])


DRAW_PURPOSE = 0x647261  # "dra"


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator from a generator, an int seed (hashed with a purpose tag), or None (fresh entropy)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        g = torch.Generator()
        g.seed()
        return g
    if isinstance(generator, int) and not isinstance(generator, bool) and generator >= 0:
        return seeded_generator(generator, DRAW_PURPOSE)
    raise TypeError(f"generator must be a torch.Generator, a non-negative int seed or None, got {generator!r}")


class NoDraws:
    """The noise of a deterministic estimator (softmax, Nystromformer, linear attention): kind "none", an empty
    draw (R, 0) per call, so the Monte-Carlo engine treats it like any other and measures variance 0."""

    noise_kind = "none"

    def noise_layout(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
        return (0,)

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """An empty draw: (R, 0)."""
        _checks.integer("replicates", replicates)
        return Draw(torch.zeros(replicates, 0, dtype=torch.float64), self.noise_kind)


class GaussianDraws:
    """The noise of estimators that sample standard normals eps ~ N(0, I) in their ``noise_layout`` (EVA, LARA)."""

    def draw(self, q: torch.Tensor, k: torch.Tensor, *, replicates: int = 1, generator=None) -> Draw:
        """Sample eps ~ N(0, I): Draw with noise (R, *noise_layout), float64 on the generator's device."""
        _checks.integer("replicates", replicates)
        noise = gaussian_noise(replicates, *self.noise_layout(q, k), generator=make_generator(generator))
        return Draw(noise, self.noise_kind)
