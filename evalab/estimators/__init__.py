"""The estimators: exact softmax, random-feature attention, the control-variate view and EVA, under one
protocol (:mod:`evalab.estimators.base`); their randomness lives in a :class:`Draw`."""
from . import features
from .adapter import FeatureMapAttention
from .base import Cost, Estimator
from .control_variates import ControlVariates, ControlVariateTerms
from .draw import Draw
from .eva import EVA
from .lara import LARA
from .learned import T2R, Hedgehog, ReBased
from .linear import LinearAttention
from .nystrom import Nystrom
from .ra import RA
from .rfa import RFA
from .scatterbrain import Scatterbrain
from .softmax import Softmax, softmax_attention
from .window import LocalWindow

__all__ = ["ControlVariateTerms", "ControlVariates", "Cost", "Draw", "EVA", "Estimator", "LARA", "RA", "RFA", "Softmax",
           "features", "softmax_attention"]
__all__ += ["LinearAttention", "Nystrom", "Scatterbrain"]
__all__ += ["FeatureMapAttention", "Hedgehog", "LocalWindow", "ReBased", "T2R"]
