"""Names under which specs refer to input workloads: ``kind = "gaussian"`` and friends."""
from __future__ import annotations

from .minilm import minilm_head
from .model import model_inputs
from .synthetic import gaussian

INPUTS = {"gaussian": gaussian, "minilm": minilm_head, "model": model_inputs}


def make_inputs(kind: str, **params):
    """Build a registered input workload (a QKV): ``make_inputs("gaussian", seq_len=256, norm=1.5)``."""
    if kind not in INPUTS:
        raise ValueError(f"inputs kind {kind!r} is not registered; expected one of {', '.join(map(repr, INPUTS))}")
    return INPUTS[kind](**params)
