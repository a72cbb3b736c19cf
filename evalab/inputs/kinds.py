"""Names under which specs refer to input workloads: ``kind = "gaussian"`` and friends.

INPUTS: the kinds that build q, k, v (a QKV). MODEL_RUNS: the kinds that name a pretrained model and its texts
(their checked settings, a dict) for measurements that run the model end to end. What a sweep measures on each
kind is the sweep runner's business (its measurement table, evalab.sweep.runner.MEASUREMENTS).
"""
from __future__ import annotations

from .minilm import minilm_head
from .model import model_inputs
from .synthetic import gaussian

INPUTS = {"gaussian": gaussian, "minilm": minilm_head}
MODEL_RUNS = {"model": model_inputs}


def names() -> dict:
    """Every kind a spec may name -> the function whose keyword parameters are its ``[inputs]`` keys."""
    return {**INPUTS, **MODEL_RUNS}


def kind_function(kind: str):
    """The function that builds inputs ``kind`` (ValueError naming the registered kinds for another)."""
    table = names()
    if kind not in table:
        raise ValueError(f"inputs kind {kind!r} is not registered; expected one of {', '.join(map(repr, table))}")
    return table[kind]


def make_inputs(kind: str, **params):
    """Build a registered input workload: ``make_inputs("gaussian", seq_len=256, norm=1.5)`` (a QKV), or the
    checked settings of a model run, ``make_inputs("model", texts=8)`` (a dict)."""
    return kind_function(kind)(**params)
