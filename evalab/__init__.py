"""evalab: measure how well efficient attention approximates exact softmax attention.

    import evalab as ev
    q, k, v = ev.inputs.gaussian(seq_len=256, d=64, norm=1.5)
    est = ev.RFA(num_features=64)
    draw = est.draw(q, k, replicates=100, generator=0)
    y = est(q, k, v, draw)                              # (100, N, dv)
    res = ev.monte_carlo(est, q, k, v, replicates=1000)  # bias, variance, error with 95% intervals

The names of this face are loaded on first use (the table ``_FACE``): ``import evalab`` imports neither torch nor
pandas, and ``ev.model_gap`` imports transformers only when called. Subpackages (``ev.estimators``,
``ev.sweep``...) are imported on first access too.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from . import _moved
from ._version import __version__

#: The public face: name -> where it lives, as a dotted path below ``evalab`` (``"estimators.EVA"``: the attribute
#: EVA of evalab.estimators; ``"measure.theory"``: the module). Adding a public name is one line here.
_FACE = {
    "Attribution": "measure.attribution.Attribution",
    "Comparison": "measure.monte_carlo.Comparison",
    "ControlVariateTerms": "estimators.ControlVariateTerms",
    "ControlVariates": "estimators.ControlVariates",
    "Cost": "estimators.Cost",
    "Draw": "estimators.Draw",
    "EVA": "estimators.EVA",
    "Estimate": "measure.intervals.Estimate",
    "Estimator": "estimators.Estimator",
    "FeatureMapAttention": "estimators.FeatureMapAttention",
    "FitResult": "measure.fit.FitResult",
    "Fitted": "estimators.fitted.Fitted",
    "FittedLayers": "estimators.fitted.FittedLayers",
    "GradientGap": "measure.gradient_gap.GradientGap",
    "Hedgehog": "estimators.Hedgehog",
    "LARA": "estimators.LARA",
    "LinearAttention": "estimators.LinearAttention",
    "LocalWindow": "estimators.LocalWindow",
    "MCResult": "measure.monte_carlo.MCResult",
    "ModelGap": "measure.model_gap.ModelGap",
    "Nystrom": "estimators.Nystrom",
    "RA": "estimators.RA",
    "RFA": "estimators.RFA",
    "ReBased": "estimators.ReBased",
    "Scatterbrain": "estimators.Scatterbrain",
    "Softmax": "estimators.Softmax",
    "T2R": "estimators.T2R",
    "attention_matrix": "measure.monte_carlo.attention_matrix",
    "compare": "measure.monte_carlo.compare",
    "error_propagation": "measure.model_gap.error_propagation",
    "estimate_cost": "measure.cost.estimate_cost",
    "features": "estimators.features",
    "fit": "measure.fit.fit",
    "gap_correlation": "measure.model_gap.gap_correlation",
    "gradient_gap": "measure.gradient_gap.gradient_gap",
    "inputs": "inputs",
    "key_variance": "measure.attribution.key_variance",
    "load_fitted": "estimators.fitted.load_fitted",
    "load_results": "sweep.load_results",
    "load_spec": "sweep.load_spec",
    "model_gap": "measure.model_gap.model_gap",
    "monte_carlo": "measure.monte_carlo.monte_carlo",
    "register_estimator": "estimators.registry.register_estimator",
    "registry": "estimators.registry",
    "run_sweep": "sweep.run_sweep",
    "save_fitted": "estimators.fitted.save_fitted",
    "softmax_attention": "estimators.softmax_attention",
    "theory": "measure.theory",
}

__all__ = [*_FACE, "__version__"]


def _resolve(path: str) -> Any:
    """The object at ``evalab.<path>``: an attribute of its parent module, else a module of that name."""
    parent, _, attr = f"{__name__}.{path}".rpartition(".")
    module = importlib.import_module(parent)
    if parent != __name__ and hasattr(module, attr):
        return getattr(module, attr)
    return importlib.import_module(f"{parent}.{attr}")


def __getattr__(name: str) -> Any:
    if name in _FACE:
        value = _resolve(_FACE[name])
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # a subpackage: ev.estimators, ev.sweep, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FACE))


class _Face(ModuleType):
    """The package module: importing a submodule binds it on its parent (``import evalab.model_gap``, an old
    module path, would set ``evalab.model_gap``); a module is not bound over a face name that means another
    object, so ``ev.model_gap`` stays the function (evalab/_moved.py)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and name in _FACE and value.__name__ != f"{__name__}.{_FACE[name]}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
_moved.install()
