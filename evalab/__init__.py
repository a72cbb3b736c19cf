"""evalab: measure how well efficient attention approximates exact softmax attention.

    import evalab as ev
    est = ev.RFA(num_features=64)
    draw = est.draw(q, k, replicates=100, generator=0)
    y = est(q, k, v, draw)                      # (100, *batch, N, dv)
    exact = ev.softmax_attention(q, k, v)       # (*batch, N, dv)
"""
from . import features, inputs
from .control_variates import ControlVariates, ControlVariateTerms
from .draw import Draw
from .eva import EVA
from .rfa import RFA
from .softmax import softmax_attention

__version__ = "0.1.0"

__all__ = [
    "ControlVariateTerms",
    "ControlVariates",
    "Draw",
    "EVA",
    "RFA",
    "features",
    "inputs",
    "softmax_attention",
    "__version__",
]
