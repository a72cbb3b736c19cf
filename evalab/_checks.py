"""Argument checks shared by the estimators: each error names the argument, the value and what was expected."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_MAX_MEMORY = 2 * 2**30  # bytes: the default budget of the memory-bounded measurements


def choice(name: str, value: object, valid: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``valid``; raise a ValueError listing the valid choices otherwise."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, valid))}")
    return value


def boolean(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def integer(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer (a numpy integer too) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def real(name: str, value: object, *, minimum: float = 0.0, allow_none: bool = False, strict: bool = False) -> float | None:
    """Return ``value`` as a finite float >= ``minimum`` (> when ``strict``); ``None`` passes when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def tensor(name: str, value: object, *, min_dim: int = 2) -> torch.Tensor:
    """Check that ``value`` is a floating tensor with at least ``min_dim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have shape (*batch, length, features), got shape {tuple(value.shape)}")
    return value


def float_dtype(name: str, value: object) -> torch.dtype:
    """A floating torch dtype given as one (``torch.float32``) or by name (``"float32"``)."""
    names = [str(t).removeprefix("torch.") for t in FLOAT_DTYPES]
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}={value!r} is not a floating dtype; expected one of {', '.join(names)} (a torch.dtype or its name)")
    return dtype


def memory(what: str, needed: float, max_memory: float, bound: str) -> None:
    """Refuse work whose estimated peak (``needed`` bytes) is over ``max_memory`` bytes before anything is
    allocated: a one-line MemoryError with both sizes and ``bound``, what to change."""
    if needed > max_memory:
        raise MemoryError(f"{what} needs about {needed / 2**30:.3g} GiB, over max_memory={max_memory / 2**30:.3g} GiB; {bound}")


def finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds nan or inf. A finite sum proves every element finite (nan and inf propagate) at
    a fraction of an elementwise check's cost; only a non-finite sum (perhaps an overflow) is looked at closely."""
    total = value.detach().sum(dtype=torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else None)
    if not math.isfinite(float(total)) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *, causal: bool = False) -> None:
    """Check q (*batch, N, d), k (*batch, M, d) and v (*batch, M, dv) for type, shape, device and finiteness."""
    tensor("q", q)
    tensor("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size d, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q and k must have the same batch dimensions, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    for size, n in (("N", q.shape[-2]), ("M", k.shape[-2]), ("d", q.shape[-1])):
        if n == 0:
            raise ValueError(f"empty inputs: {size}=0 (q {tuple(q.shape)}, k {tuple(k.shape)}); attention needs at "
                             "least one query (N), one key (M) and one feature (d)")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys, got N={q.shape[-2]} and M={k.shape[-2]}")
    if v is not None:
        tensor("v", v)
        if v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"v must have shape (*batch, M, dv) matching k {tuple(k.shape)}, got v {tuple(v.shape)}")
        if v.device != k.device:
            raise ValueError(f"v must be on the same device as k, got v on {v.device} and k on {k.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None:
            finite(name, t)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_scale(scale: float | None, d: int) -> float:
    """The logit scale s: ``scale`` (checked: a finite float > 0) if given, d**-0.5 otherwise."""
    return d ** -0.5 if real("scale", scale, allow_none=True, strict=True) is None else scale
