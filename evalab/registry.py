"""Names under which specs, result tables and figures refer to estimators and input kinds."""
from __future__ import annotations

import dataclasses

from .estimators.control_variates import ControlVariates
from .estimators.eva import EVA
from .inputs import gaussian
from .inputs.minilm import minilm_head
from .inputs.model import model_inputs
from .estimators.rfa import RFA
from .estimators.softmax import Softmax

ESTIMATORS = {"softmax": Softmax, "rfa": RFA, "eva": EVA, "control_variates": ControlVariates}
INPUTS = {"gaussian": gaussian, "minilm": minilm_head, "model": model_inputs}


def make_estimator(name: str, **params):
    """Build a registered estimator: ``make_estimator("rfa", num_features=64)``."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator {name!r} is not registered; expected one of {', '.join(map(repr, ESTIMATORS))}")
    cls = ESTIMATORS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"estimator {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {', '.join(sorted(known))}")
    return cls(**params)


def estimator_name(estimator) -> str:
    """The registered name of an estimator instance (the class name for estimators defined elsewhere)."""
    for name, cls in ESTIMATORS.items():
        if type(estimator) is cls:
            return name
    return type(estimator).__name__


def make_inputs(kind: str, **params):
    """Build a registered input workload (a QKV): ``make_inputs("gaussian", seq_len=256, norm=1.5)``."""
    if kind not in INPUTS:
        raise ValueError(f"inputs kind {kind!r} is not registered; expected one of {', '.join(map(repr, INPUTS))}")
    return INPUTS[kind](**params)
