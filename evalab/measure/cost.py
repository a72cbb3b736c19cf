"""Cost model: FLOPs and memory of one estimator call, from the estimator's own ``cost`` method.

Every estimator that can say what one call costs defines ``cost(*, N, M, d, dv, batch=1, itemsize=4)``
(evalab.estimators.base); this module is the one entry point the Monte-Carlo engine, sweeps and figures use.
Sizes: N queries, M keys, d feature size, dv value size, batch = product of the batch/head dimensions.
"""
from __future__ import annotations

import math

from .. import _checks
from ..estimators.base import Cost


def estimate_cost(estimator, *, N: int, M: int, d: int, dv: int, batch: int = 1, itemsize: int = 4) -> Cost:
    """The Cost of ``estimator`` on q (batch, N, d), k (batch, M, d), v (batch, M, dv); itemsize 4 (float32) or 8.

    Estimators without a ``cost`` method report NaN FLOPs and, as memory, their output only.
    """
    N, M, d, dv, batch = (_checks.integer(name, value) for name, value in
                          (("N", N), ("M", M), ("d", d), ("dv", dv), ("batch", batch)))
    if itemsize not in (2, 4, 8) or isinstance(itemsize, bool):
        raise ValueError(f"itemsize must be 2, 4 or 8 (bytes per element), got {itemsize!r}")
    model = getattr(estimator, "cost", None)
    if model is None:
        return Cost.per_element(math.nan, math.nan, 0.0, N * dv, batch=batch, itemsize=itemsize)
    cost = model(N=N, M=M, d=d, dv=dv, batch=batch, itemsize=itemsize)
    if not isinstance(cost, Cost):
        raise TypeError(f"{type(estimator).__name__}.cost must return an evalab.Cost, got {type(cost).__name__}")
    return cost
