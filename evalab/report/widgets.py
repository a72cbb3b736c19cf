"""Interactive exploration in Jupyter: ``evalab.widgets.explore()`` (needs ipywidgets, the ``notebooks`` extra).

Sliders and menus choose the estimator and its knobs (num_features, window, chunk_size) and the inputs
(synthetic Gaussian of a given norm and seq_len, or a MiniLM head when ``evalab[real]`` is installed); every
change reruns a small Monte-Carlo measurement (``monte_carlo`` with ``replicates`` draws) and shows the relative
error, squared bias and variance with their 95% intervals, beside the attention row of one query: exact
softmax against the estimator's row for one draw and the mean over the draws.

The explorer also runs headless (tests, scripts): ``ex = explore(); ex.update(estimator="RFA",
num_features=64)`` recomputes at once and leaves the numbers in ``ex.result`` (an MCResult), the table in
``ex.table.value`` (HTML) and the plot in ``ex.figure`` (matplotlib) and ``ex.plot.value`` (PNG bytes).
"""
from __future__ import annotations

import dataclasses
import html
import io

import torch

from ..estimators import registry
from ..inputs import kinds
from ..inputs.minilm import available as minilm_available
from ..estimators.control_variates import ControlVariates
from ..estimators.eva import EVA
from ..estimators.rfa import RFA
from ..estimators.softmax import softmax_attention
from ..measure.monte_carlo import attention_matrix, monte_carlo

#: The menu: label -> builder from the knobs. Registered estimators follow as "registered: <name>".
BUILDERS = {
    "RFA": lambda p: RFA(num_features=p["num_features"]),
    "EVA": lambda p: EVA(window=p["window"], chunk_size=p["chunk_size"]),
    "softmax window (EVA window only)": lambda p: EVA(window=p["window"], chunk_size=0),
    "ControlVariates (chunked)": lambda p: ControlVariates(num_features=p["num_features"], coefficient="chunked",
                                                           chunk_size=p["chunk_size"]),
}
KNOBS = ("num_features", "window", "chunk_size")
METRICS = ("rel_error", "rel_mse", "rel_bias2", "rel_variance")
SYNTHETIC, REAL = "synthetic Gaussian", "MiniLM (layer 0, head 0)"


def build_estimator(name: str, params: dict):
    """The estimator of menu entry ``name`` with the knobs in ``params`` (and the head size ``d``); a registered
    estimator takes those of its fields whose default is not None (an optional knob such as ControlVariates'
    chunk_size keeps its default; a learned map takes ``d``)."""
    if name in BUILDERS:
        return BUILDERS[name](params)
    registered = name.removeprefix("registered: ")
    fields = {f.name: f.default for f in dataclasses.fields(registry.ESTIMATORS[registered])}
    return registry.make_estimator(registered, **{k: v for k, v in params.items()
                                                  if k in fields and fields[k] is not None})


class Explorer:
    """The widget (``.widget``, shown when the Explorer is the cell's value) and its latest measurement."""

    def __init__(self, *, replicates: int = 32, seed: int = 0, d: int = 32, dtype=torch.float32):
        import ipywidgets as w

        self.replicates, self.seed, self.d, self.dtype = replicates, seed, d, dtype
        entries = list(BUILDERS) + [f"registered: {n}" for n in registry.ESTIMATORS]
        self.controls = {
            "estimator": w.Dropdown(options=entries, value="RFA", description="estimator"),
            "num_features": w.SelectionSlider(options=[4, 8, 16, 32, 64, 128, 256], value=32, description="num_features"),
            "window": w.SelectionSlider(options=[0, 8, 16, 32, 64], value=16, description="window"),
            "chunk_size": w.SelectionSlider(options=[1, 2, 4, 8, 16], value=8, description="chunk_size"),
            "inputs": w.Dropdown(options=[SYNTHETIC] + ([REAL] if minilm_available() else []), value=SYNTHETIC,
                                 description="inputs"),
            "norm": w.FloatSlider(value=1.0, min=0.25, max=3.0, step=0.25, description="norm"),
            "seq_len": w.SelectionSlider(options=[32, 64, 128, 256, 512], value=64, description="seq_len"),
            "query": w.IntSlider(value=0, min=0, max=63, description="query"),
        }
        style = {"description_width": "90px"}
        for control in self.controls.values():
            control.style = style
            control.continuous_update = False
        self.table = w.HTML()
        self.plot = w.Image(format="png")
        self.widget = w.HBox([w.VBox(list(self.controls.values())), w.VBox([self.table, self.plot])])
        self.result = self.figure = None
        self._inputs_key = self._qkv = None
        for control in self.controls.values():
            control.observe(lambda change: self.refresh(), names="value")
        self.refresh()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def update(self, **values) -> "Explorer":
        """Set controls by name (``update(estimator="EVA", window=32)``) and recompute once."""
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise ValueError(f"no control {', '.join(map(repr, unknown))}; controls: {', '.join(self.controls)}")
        self._hold = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._hold = False
        return self.refresh()

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def inputs(self):
        """(q, k, v, scale) of the chosen inputs, cached while they do not change."""
        v = self.values()
        key = (v["inputs"], v["seq_len"]) + ((v["norm"],) if v["inputs"] == SYNTHETIC else ())
        if key != self._inputs_key:
            if v["inputs"] == SYNTHETIC:
                qkv = kinds.make_inputs("gaussian", seq_len=v["seq_len"], d=self.d, norm=v["norm"], seed=self.seed,
                                           dtype=self.dtype)
            else:
                qkv = kinds.make_inputs("minilm", seq_len=v["seq_len"], layer=0, head=0)
            self._inputs_key, self._qkv = key, qkv
        return self._qkv.q, self._qkv.k, self._qkv.v, self._qkv.scale

    def refresh(self) -> "Explorer":
        """Recompute with the current controls; an invalid combination shows its error instead of numbers."""
        if getattr(self, "_hold", False):
            return self
        v = self.values()
        self.controls["norm"].disabled = v["inputs"] != SYNTHETIC
        try:
            q, k, values, scale = self.inputs()
            if self.controls["query"].max != q.shape[-2] - 1:  # queries of this seq_len (clamps the value)
                self._hold = True
                self.controls["query"].max = q.shape[-2] - 1
                self._hold = False
            est = build_estimator(v["estimator"], {**{n: v[n] for n in KNOBS}, "d": q.shape[-1]})
            if "scale" in {f.name for f in dataclasses.fields(est)}:
                est = dataclasses.replace(est, scale=scale)
            self.result = monte_carlo(est, q, k, values, replicates=self.replicates, seed=self.seed, matrix=False)
        except (ValueError, TypeError, ImportError, MemoryError) as err:
            self.result, self.figure = None, None
            self.table.value = f"<b>cannot run:</b> {html.escape(str(err))}"
            self.plot.value = b""
            return self
        self.table.value = self._table(est)
        self.figure = self._figure(est, q, k, self.controls["query"].value)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
        self.plot.value = buffer.getvalue()
        return self

    def _table(self, est) -> str:
        rows = "".join(
            f"<tr><td>{name}</td><td>{self.result.metrics[name].value:.4g}</td>"
            f"<td>[{self.result.metrics[name].low:.4g}, {self.result.metrics[name].high:.4g}]</td></tr>"
            for name in METRICS)
        return (f"<b>{html.escape(repr(est))}</b><br>{self.replicates} replicates, seed {self.seed}, "
                f"seq_len {self.result.sizes['seq_len']}"
                f"<table><tr><th>metric</th><th>value</th><th>95% interval</th></tr>{rows}</table>")

    def _figure(self, est, q, k, n: int):
        """Attention row of query n: exact softmax, one draw, and the mean over the first draws."""
        from matplotlib.figure import Figure  # no pyplot: nothing global, no backend needed

        draw = est.draw(q, k, replicates=min(8, self.replicates), generator=self.seed)
        scale = getattr(est, "scale", None)
        exact = softmax_attention(q, k, torch.eye(k.shape[-2], dtype=q.dtype), scale=scale)[n]
        approx = attention_matrix(est, q, k, draw)[:, n]
        fig = Figure(figsize=(6.4, 2.8))
        ax = fig.subplots()
        keys = torch.arange(k.shape[-2])
        ax.plot(keys, exact.float(), color="black", linewidth=1.5, label="exact softmax")
        ax.plot(keys, approx[0].float(), color="C0", linewidth=0.9, alpha=0.8, label="one draw")
        ax.plot(keys, approx.float().mean(0), color="C1", linewidth=1.2, linestyle="--",
                label=f"mean of {approx.shape[0]} draws")
        ax.set(xlabel="key m", ylabel=f"A[{n}, m]", title=f"attention row of query {n}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def explore(*, replicates: int = 32, seed: int = 0, d: int = 32) -> Explorer:
    """An interactive explorer of estimator error (see the module docstring); display it as a cell's value."""
    return Explorer(replicates=replicates, seed=seed, d=d)
