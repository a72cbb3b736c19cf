"""The result base (evalab.measure.result): a new measurement's result is a few lines and gets metric lookup, the
tidy to_frame row and repr; the built-in results keep their rows; estimator_parameters reads classes and instances."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import evalab as ev
from evalab.estimators.registry import REQUIRED, estimator_parameters
from evalab.measure.intervals import Estimate
from evalab.measure.result import Result, estimator_columns


@dataclass(frozen=True, repr=False)
class Toy(Result):
    estimator: object
    metrics: dict

    def columns(self):
        return estimator_columns(self.estimator)

    def extra_columns(self):
        return {"note": "x"}

    def title(self):
        return "Toy"


def test_a_new_result_in_a_few_lines():
    res = Toy(ev.RFA(num_features=8), {"gap": Estimate(0.5, 0.25, 0.75), "other": Estimate(1.0, 0.5, 2.0)})
    assert res.gap == Estimate(0.5, 0.25, 0.75)
    with pytest.raises(AttributeError, match="Toy has no metric 'nope'; metrics: gap, other"):
        res.nope
    row = res.to_frame().iloc[0].to_dict()
    assert list(row)[:3] == ["estimator", "num_features", "feature_map"] and row["estimator"] == "rfa"
    assert [k for k in row if k.startswith(("gap", "other"))] == ["gap", "gap_low", "gap_high", "other", "other_low",
                                                                 "other_high"]
    assert (row["gap"], row["gap_low"], row["gap_high"], row["note"]) == (0.5, 0.25, 0.75, "x")  # exact: values passed through
    assert repr(res) == "Toy\n  gap                    0.5 [0.25, 0.75]\n  other                  1 [0.5, 2]"


def test_monte_carlo_row_and_repr_keep_their_layout():
    q, k, v = ev.inputs.gaussian(seq_len=8, d=4, norm=1.0, seed=0)
    res = ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=4, seed=0)
    row = res.to_frame().iloc[0]
    assert list(row.index[:9]) == ["estimator", "num_features", "feature_map", "sampler", "causal", "eps", "scale",
                                   "shared_noise", "gerf_a"]
    assert row["rel_mse"] == res.rel_mse.value and row["rel_mse_low"] == res.rel_mse.low
    assert list(row.index[-3:]) == ["flops", "peak_bytes", "matrix_skipped"]
    assert repr(res).splitlines()[0].startswith("MCResult(RFA, replicates=4, seed=0, ")
    assert repr(res).splitlines()[1].startswith("  mse                ")  # names padded to 18


def test_estimator_parameters_of_a_class_and_of_an_instance():
    assert estimator_parameters(ev.Softmax) == {"causal": False, "scale": None}
    assert estimator_parameters(ev.Softmax(causal=True)) == {"causal": True, "scale": None}

    class Plain:
        def __init__(self, width, depth=2):
            self.width = width

    assert estimator_parameters(Plain) == {"width": REQUIRED, "depth": 2}
    assert estimator_parameters(Plain(3)) == {"width": 3}  # depth is not kept as an attribute
