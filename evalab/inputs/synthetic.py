"""Synthetic attention inputs with the scaled input norm as an explicit knob.

RFA's variance is governed by |x + y|^2 for scaled x = sqrt(scale) q, y = sqrt(scale) k, so ``gaussian`` sets
|x| and |y| exactly (directions uniform on the sphere), and ``mode="peaked"`` clusters keys around a few
queries so that attention rows are peaked (low entropy), as in trained models.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from ..estimators.draw import seeded_generator
from .qkv import QKV

INPUTS_PURPOSE = 0x696E70  # "inp"

MODES = ("gaussian", "peaked")


def _sphere(shape: tuple[int, ...], d: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    return u / u.norm(dim=-1, keepdim=True)


def gaussian_bytes(*, seq_len: int, d: int, dv: int | None = None, batch: tuple[int, ...] = (),
                   key_len: int | None = None, itemsize: int = 8) -> int:
    """Peak bytes ``gaussian`` takes: q, k and v built in float64, a float64 temporary the size of the larger of
    q and k (normalising), and the cast to ``itemsize`` bytes per element."""
    M, dv = seq_len if key_len is None else key_len, d if dv is None else dv
    elements = math.prod(batch) * (seq_len * d + M * d + M * dv)
    return elements * (8 + itemsize) + math.prod(batch) * max(seq_len, M) * d * 8


def gaussian(
    *,
    seq_len: int = 128,
    d: int = 64,
    dv: int | None = None,
    batch: tuple[int, ...] = (),
    norm: float = 1.0,
    key_len: int | None = None,
    mode: str = "gaussian",
    clusters: int = 4,
    spread: float = 0.3,
    scale: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device = "cpu",
    max_memory: float | None = None,
) -> QKV:
    """Queries and keys with scaled norm |x| = |y| = ``norm``; values standard normal.

    Shapes: q (*batch, seq_len, d), k (*batch, key_len, d), v (*batch, key_len, dv); key_len defaults to
    seq_len, dv to d. ``mode="peaked"``: keys are noisy copies (relative noise ``spread``) of ``clusters``
    randomly chosen query directions, so each query's attention concentrates on few keys when the norm is large.
    dtype: a floating torch dtype or its name ("float32"), default torch.float64; q, k and v are drawn in float64
    and then cast to it (so a float32 result is the float64 one rounded), on ``device``. Inputs whose construction
    needs more than ``max_memory`` bytes (default 2 GiB; see gaussian_bytes) are refused before anything is allocated.
    """
    for name, value in (("seq_len", seq_len), ("d", d), ("clusters", clusters)):
        _checks.integer(name, value)
    dv = _checks.integer("dv", d if dv is None else dv)
    key_len = _checks.integer("key_len", seq_len if key_len is None else key_len)
    _checks.real("norm", norm)
    _checks.real("spread", spread)
    _checks.choice("mode", mode, MODES)
    if not all(isinstance(b, int) and b > 0 for b in batch):
        raise ValueError(f"batch must be a tuple of positive ints, got {batch!r}")
    s = _checks.resolve_scale(scale, d)
    dtype = _checks.float_dtype("dtype", dtype)
    max_memory = _checks.DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    needed = gaussian_bytes(seq_len=seq_len, d=d, dv=dv, batch=batch, key_len=key_len,
                            itemsize=torch.finfo(dtype).bits // 8)
    _checks.memory(f"inputs.gaussian with batch={batch!r}, seq_len={seq_len}, key_len={key_len}, d={d}, dv={dv}", needed,
                   _checks.real("max_memory", max_memory, strict=True),
                   "pass a smaller seq_len, key_len, d, dv or batch, or raise max_memory")
    g = seeded_generator(_checks.integer("seed", seed, minimum=0), INPUTS_PURPOSE)
    queries = _sphere((*batch, seq_len), d, g)
    if mode == "gaussian":
        keys = _sphere((*batch, key_len), d, g)
    else:
        centres = torch.randint(0, seq_len, (*batch, key_len), generator=g)
        base = torch.gather(queries, -2, centres.unsqueeze(-1).expand(*batch, key_len, d))
        keys = base + spread * _sphere((*batch, key_len), d, g)
        keys = keys / keys.norm(dim=-1, keepdim=True)
    values = torch.randn(*batch, key_len, dv, generator=g, dtype=torch.float64)
    to_q = norm / math.sqrt(s)
    cast = lambda t: t.to(device=device, dtype=dtype)
    info = {"kind": "gaussian", "mode": mode, "norm": norm, "seed": seed}
    return QKV(cast(queries * to_q), cast(keys * to_q), cast(values), s, info)
