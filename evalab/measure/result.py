"""Result: the base every measurement's result type shares (MCResult, GradientGap, ModelGap, ...).

A result is a frozen dataclass with a ``metrics`` dict, name -> Estimate (value and interval). The base gives
- metric lookup: ``res.rel_mse`` is ``res.metrics["rel_mse"]`` (AttributeError listing the metrics otherwise);
- ``to_frame()``: one tidy row, ``columns()`` first, then every metric as ``name``, ``name_low``, ``name_high``,
  then ``extra_columns()``;
- ``repr``: ``title()``, then one line per metric, then ``notes()``.
A new measurement's result is a ``@dataclass(frozen=True, repr=False)`` (``repr=False`` keeps this repr) that
defines ``columns`` and ``title`` (and, where it has them, ``extra_columns`` and ``notes``); the rest comes from
here.
"""
from __future__ import annotations

import pandas as pd

from ..estimators.registry import estimator_name, estimator_parameters

__all__ = ["Result", "estimator_columns", "metric_columns"]


def estimator_columns(estimator) -> dict:
    """The columns naming an estimator in a row: ``estimator`` (its registered name) and its parameters."""
    return {"estimator": estimator_name(estimator), **estimator_parameters(estimator)}


def metric_columns(metrics: dict) -> dict:
    """``name``, ``name_low``, ``name_high`` for every Estimate of ``metrics``."""
    row = {}
    for name, est in metrics.items():
        row.update({name: est.value, f"{name}_low": est.low, f"{name}_high": est.high})
    return row


class Result:
    """Metric lookup, the tidy ``to_frame`` row and ``repr`` of a result with a ``metrics`` dict."""

    #: width of the metric-name column in ``repr``
    name_width = 22

    def __getattr__(self, name: str):
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__} has no metric {name!r}; metrics: {', '.join(metrics)}")

    def columns(self) -> dict:
        """The columns before the metrics (what was measured, on what, with which seed)."""
        raise NotImplementedError

    def extra_columns(self) -> dict:
        """The columns after the metrics (costs and the like)."""
        return {}

    def title(self) -> str:
        """The first line of ``repr``."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines of ``repr`` after the metrics."""
        return []

    def to_frame(self) -> pd.DataFrame:
        """One tidy row: ``columns()``, every metric with ``_low``/``_high`` bounds, ``extra_columns()``."""
        return pd.DataFrame([{**self.columns(), **metric_columns(self.metrics), **self.extra_columns()}])

    def __repr__(self) -> str:
        lines = [self.title()]
        lines += [f"  {name:<{self.name_width}} {est!r}" for name, est in self.metrics.items()]
        return "\n".join(lines + self.notes())
