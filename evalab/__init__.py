"""evalab: measure how well efficient attention approximates exact softmax attention.

    import evalab as ev
    q, k, v = ev.inputs.gaussian(seq_len=256, d=64, norm=1.5)
    est = ev.RFA(num_features=64)
    draw = est.draw(q, k, replicates=100, generator=0)
    y = est(q, k, v, draw)                              # (100, N, dv)
    res = ev.monte_carlo(est, q, k, v, replicates=1000)  # bias, variance, error with 95% intervals
"""
from . import _moved, inputs
from .measure import theory
from .measure.attribution import Attribution, key_variance
from .measure.cost import estimate_cost
from .estimators import (EVA, LARA, RA, RFA, ControlVariates, ControlVariateTerms, Cost, Draw, Estimator, Softmax,
                         features, softmax_attention)
from .estimators import LinearAttention, Nystrom, Scatterbrain
from .estimators import T2R, FeatureMapAttention, Hedgehog, LocalWindow, ReBased
from .estimators.fitted import Fitted, FittedLayers, load_fitted, save_fitted
from .measure.fit import FitResult, fit
from .measure.gradient_gap import GradientGap, gradient_gap
from .measure.intervals import Estimate
from .measure.model_gap import ModelGap, error_propagation, gap_correlation, model_gap
from .measure.monte_carlo import Comparison, MCResult, attention_matrix, compare, monte_carlo
from .estimators import registry
from .estimators.registry import register_estimator
from .sweep import load_results, load_spec, run_sweep

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "Attribution",
    "Comparison",
    "ControlVariateTerms",
    "ControlVariates",
    "Cost",
    "Draw",
    "EVA",
    "Estimate",
    "Estimator",
    "FitResult",
    "Fitted",
    "FittedLayers",
    "FeatureMapAttention",
    "GradientGap",
    "Hedgehog",
    "LARA",
    "LinearAttention",
    "LocalWindow",
    "MCResult",
    "ModelGap",
    "Nystrom",
    "RA",
    "RFA",
    "ReBased",
    "Scatterbrain",
    "Softmax",
    "T2R",
    "attention_matrix",
    "compare",
    "error_propagation",
    "estimate_cost",
    "features",
    "fit",
    "gap_correlation",
    "gradient_gap",
    "inputs",
    "key_variance",
    "load_fitted",
    "load_results",
    "load_spec",
    "model_gap",
    "monte_carlo",
    "register_estimator",
    "run_sweep",
    "save_fitted",
    "softmax_attention",
    "theory",
    "__version__",
]
