"""The shared figure layer: one display name, colour and marker per estimator variant, one theme, column checks,
interval drawing and saving. Every paper figure (analysis/figures/*/plot.py) draws through this module, so that
"RFA iid" is the same blue with the same marker in every figure.

Figures read stored result rows (sweep rows, cached tables) and never run an estimator:

    from evalab import figures as fg
    rows = fg.with_variant(evalab.load_results("results/smoke", status="ok"))
    with fg.style():
        fig, ax = plt.subplots()
        for name, group in fg.by_variant(rows):
            fg.errorbar(ax, group, "num_features", "rel_mse", name)
    fg.save(fig, "figures", "my_figure")          # figures/my_figure.png and .pdf
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "VARIANTS", "variant", "with_variant", "by_variant", "color", "marker", "palette", "ordered", "style",
    "require_columns", "require_frame", "save", "interval", "errorbar", "band", "pareto_front", "legend",
    "log_positive", "sizes", "value_ticks", "tidy_log", "tick_label", "softmax_flops", "mark_softmax_cost",
    "softmax_cost_handle", "ratio_text", "DPI",
]

DPI = 150

# Display name -> (colour, marker), in legend order. Colours from seaborn's colour-blind palette (the field of F10
# partly from Paul Tol's muted one, so that no two of its series share a hue); RFA samplers are cool colours, EVA
# and local attention warm, exact softmax black.
VARIANTS: dict[str, tuple[str, str]] = {
    "RFA iid": ("#0173b2", "o"),
    "RFA orthogonal": ("#56b4e9", "s"),
    "RFA qmc": ("#cc78bc", "D"),
    "RFA hyperbolic": ("#029e73", "^"),
    "RFA trig": ("#ca9161", "v"),
    "EVA": ("#d55e00", "P"),
    "EVA (no window)": ("#fbafe4", "X"),
    "local window": ("#de8f05", "h"),
    "softmax": ("#000000", "*"),
    "CV shared": ("#3d5a80", "o"),
    "CV chunked": ("#9c2c2c", "P"),
    "CV optimal": ("#555555", "*"),
    # the field beyond RFA and EVA (F10)
    "RFA hyperbolic orthogonal": ("#117733", "v"),
    "EVA, samples per chunk": ("#a6761d", "X"),
    "Scatterbrain": ("#6a3d9a", ">"),
    "Nystromformer": ("#88ccee", "<"),
    "Nystromformer, exact pinv": ("#882255", "d"),
    "elu+1": ("#999999", "H"),
    "RA": ("#e7298a", "p"),
    "LARA": ("#999933", "8"),
    # fixed and learned feature maps, window hybrids (F12)
    "taylor": ("#8c564b", "s"),
    "taylor + window (g = 1/2)": ("#c49c94", "D"),
    "taylor + window": ("#5c3a33", "D"),
    "dpfp": ("#bcbd22", "^"),
    "hedgehog (initial)": ("#9edae5", "o"),
    "hedgehog": ("#17becf", "o"),
    "hedgehog + window": ("#0b5c66", "P"),
    "t2r": ("#e377c2", "v"),
}
_EXTRA_COLORS = ("#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39", "#7b4173")
_EXTRA_MARKERS = ("p", "<", ">", "d", "H", "8")
_FAMILY = {"rfa": "RFA", "eva": "EVA", "softmax": "softmax", "control_variates": "CV"}


def _value(row, name, default=None):
    value = row.get(name, default) if hasattr(row, "get") else getattr(row, name, default)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


def _derived(row) -> str:
    """The display name implied by a row's estimator and hyper-parameters."""
    est = _value(row, "estimator", "")
    if est == "softmax":
        return "softmax"
    if est == "rfa":
        feature_map, sampler = _value(row, "feature_map", "positive"), _value(row, "sampler", "iid")
        if feature_map == "positive":
            return f"RFA {sampler}"
        return f"RFA {feature_map}" + ("" if sampler == "iid" else f" {sampler}")
    if est == "eva":
        if not _value(row, "chunk_size", 8):
            return "local window"
        if not _value(row, "window", 32):
            return "EVA (no window)"
        return "EVA"
    if est == "control_variates":
        return f"CV {_value(row, 'coefficient', 'shared')}"
    if est == "local_window":
        return "local window"
    return str(_value(row, "label", est) or "unknown")


def variant(row) -> str:
    """Display name of a result row's estimator variant: "RFA iid", "RFA orthogonal", "RFA qmc", "RFA hyperbolic",
    "RFA trig", "EVA", "local window" (local_window, or EVA with chunk_size 0), "softmax", "CV shared|chunked|optimal".

    A sweep ``label`` is used as the name when it is specific: labels that only repeat the estimator family
    ("rfa", "RFA", "eva", "EVA", ...) give the derived name, so "RFA" rows still split into their samplers.
    ``row`` is a mapping (dict, pandas Series) with at least ``estimator``.
    """
    derived = _derived(row)
    label = _value(row, "label")
    est = str(_value(row, "estimator", ""))
    generic = {est.lower(), _FAMILY.get(est, est).lower(), derived.lower()}
    if isinstance(label, str) and label and label.lower() not in generic:
        return label
    return derived


def with_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with a ``variant`` column (see :func:`variant`)."""
    require_columns(frame, ["estimator"], "with_variant")
    out = frame.copy()
    out["variant"] = [variant(row) for row in frame.to_dict("records")] if len(frame) else pd.Series(dtype=str)
    return out


def ordered(names: Iterable[str]) -> list[str]:
    """Distinct variant names in legend order: the known variants first (in VARIANTS order), others sorted."""
    names = list(dict.fromkeys(names))
    known = [n for n in VARIANTS if n in names]
    return known + sorted(n for n in names if n not in VARIANTS)


def by_variant(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(variant, rows) pairs in legend order; adds the variant column when missing."""
    if "variant" not in frame.columns:
        frame = with_variant(frame)
    for name in ordered(frame["variant"]):
        yield name, frame[frame["variant"] == name]


def _stable_index(name: str, n: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n


def color(name: str) -> str:
    """The colour of a variant in every figure (unknown names get a fixed colour from their name's hash)."""
    if name in VARIANTS:
        return VARIANTS[name][0]
    return _EXTRA_COLORS[_stable_index(name, len(_EXTRA_COLORS))]


def marker(name: str) -> str:
    """The marker of a variant in every figure."""
    if name in VARIANTS:
        return VARIANTS[name][1]
    return _EXTRA_MARKERS[_stable_index(name, len(_EXTRA_MARKERS))]


def palette(names: Iterable[str]) -> dict[str, str]:
    """variant -> colour, for seaborn's ``palette=`` with ``hue="variant"``."""
    return {name: color(name) for name in ordered(names)}


@contextlib.contextmanager
def style(font_scale: float = 1.15):
    """The seaborn theme of every evalab figure (white grid, paper context), applied temporarily."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=font_scale)}
    rc.update({
        "figure.dpi": 100, "savefig.dpi": DPI, "legend.frameon": True, "legend.framealpha": 0.9,
        "axes.titleweight": "bold", "pdf.fonttype": 42, "grid.linewidth": 0.6, "lines.markersize": 5,
    })
    with matplotlib.rc_context(rc):
        yield


def require_columns(frame, columns: Iterable[str], figure: str) -> None:
    """Raise ValueError naming ``figure`` and the columns of ``columns`` that ``frame`` lacks."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{figure}: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{figure}: the frame lacks required columns {', '.join(map(repr, missing))} "
            f"(it has {len(frame.columns)} columns: {', '.join(map(str, list(frame.columns)[:12]))}"
            f"{', ...' if len(frame.columns) > 12 else ''})"
        )


def require_frame(frames: dict, name: str, columns: Iterable[str], figure: str) -> pd.DataFrame:
    """``frames[name]`` after :func:`require_columns`; a missing or empty table is a ValueError too."""
    if not isinstance(frames, dict):
        raise TypeError(f"{figure}: frames must be a dict of name -> DataFrame, got {type(frames).__name__}")
    if name not in frames:
        raise ValueError(f"{figure}: missing table {name!r} (got tables: {', '.join(map(repr, frames)) or 'none'})")
    frame = frames[name]
    require_columns(frame, columns, f"{figure} table {name!r}")
    if frame.empty:
        raise ValueError(f"{figure}: table {name!r} has no rows")
    return frame


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.png`` (DPI dots per inch) and ``out_dir/name.pdf``; returns both paths.

    No timestamps are embedded, so unchanged figures give unchanged files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    return [png, pdf]


def interval(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) arrays of ``metric``'s 95% interval from the ``<metric>_low``/``<metric>_high`` columns."""
    require_columns(frame, [f"{metric}_low", f"{metric}_high"], f"interval of {metric}")
    return frame[f"{metric}_low"].to_numpy(float), frame[f"{metric}_high"].to_numpy(float)


def log_positive(values, floor: float) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite entries replaced by ``floor``."""
    values = np.asarray(values, dtype=float)
    return np.where(np.isfinite(values) & (values > 0), values, floor)


def _yerr(y: np.ndarray, low: np.ndarray, high: np.ndarray, log: bool) -> np.ndarray:
    """Asymmetric error-bar lengths; on a log axis a lower bound <= 0 is drawn down to y / 100."""
    lo = np.where(np.isfinite(low), low, y)
    hi = np.where(np.isfinite(high), high, y)
    if log:
        lo = np.where(lo > 0, lo, y / 100)
    return np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])


def errorbar(ax, frame: pd.DataFrame, x: str, metric: str, name: str, *, line: bool = True,
             interval_of: str | None = None, label: str | None = None, **kwargs):
    """Points (joined by a line when ``line``) of ``metric`` against ``x`` in the colour and marker of variant
    ``name``, with the 95% interval as error bars. Rows are sorted by x. ``interval_of`` names the metric whose
    ``_low``/``_high`` columns give the bars (default ``metric``)."""
    rows = frame.sort_values(x)
    y = rows[metric].to_numpy(float)
    low, high = interval(rows, interval_of or metric)
    log = ax.get_yscale() == "log"
    kwargs.setdefault("capsize", 2.5)
    kwargs.setdefault("markersize", 5)
    kwargs.setdefault("linewidth", 1.4)
    kwargs.setdefault("linestyle", "-" if line else "none")
    kwargs.setdefault("marker", marker(name))
    return ax.errorbar(rows[x].to_numpy(float), y, yerr=_yerr(y, low, high, log), color=color(name),
                       label=name if label is None else label, **kwargs)


def band(ax, frame: pd.DataFrame, x: str, metric: str, name: str, *, alpha: float = 0.2, label: str | None = None,
         **kwargs):
    """A line of ``metric`` against ``x`` with its 95% interval as a shaded band, in variant ``name``'s colour."""
    rows = frame.sort_values(x)
    xs, y = rows[x].to_numpy(float), rows[metric].to_numpy(float)
    low, high = interval(rows, metric)
    if ax.get_yscale() == "log":
        low = np.where(low > 0, low, np.nan)
    ax.fill_between(xs, low, high, color=color(name), alpha=alpha, linewidth=0)
    kwargs.setdefault("marker", marker(name))
    return ax.plot(xs, y, color=color(name), label=name if label is None else label, **kwargs)


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated by another row (smaller or equal ``x`` and ``y``, one strictly): the lower-left
    frontier, sorted by ``x``. Rows with a non-finite x or y are left out."""
    rows = frame[np.isfinite(frame[x].to_numpy(float)) & np.isfinite(frame[y].to_numpy(float))]
    rows = rows.sort_values([x, y])
    keep, best = [], math.inf
    for index, value in zip(rows.index, rows[y].to_numpy(float)):
        if value < best:
            keep.append(index)
            best = value
    return rows.loc[keep]


def legend(target, names: Iterable[str], *, extra: Iterable = (), **kwargs):
    """A legend with one entry per variant (colour and marker, in legend order) plus ``extra`` handles.

    ``target`` is an Axes or a Figure (a figure legend, e.g. below the panels).
    """
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color(n), marker=marker(n), linestyle="-", label=n) for n in ordered(names)]
    handles += list(extra)
    return target.legend(handles=handles, **kwargs)


def softmax_flops(frame: pd.DataFrame) -> np.ndarray:
    """The cost model's FLOPs of one exact softmax attention call (evalab.Softmax) on each row's inputs, from the
    size columns seq_len, key_len, d, dv and batch (key_len and dv default to seq_len and d, batch to 1): (rows,)."""
    from ..measure.cost import estimate_cost
    from ..estimators.softmax import Softmax

    require_columns(frame, ["seq_len", "d"], "softmax_flops")

    def size(row, name, default):
        value = _value(row, name, default)
        return int(value) if value is not None else int(default)

    return np.array([estimate_cost(Softmax(), N=size(r, "seq_len", 0), M=size(r, "key_len", r["seq_len"]),
                                   d=size(r, "d", 0), dv=size(r, "dv", r["d"]), batch=size(r, "batch", 1)).flops(1)
                     for r in frame.to_dict("records")], dtype=float)


def mark_softmax_cost(ax, flops, *, text: str = "softmax (exact)") -> None:
    """Exact softmax's own cost on a FLOPs axis: a black dash-dot vertical line at each distinct value of
    ``flops`` (a number or an array), labelled ``text`` along its top. Estimators to its right cost more than
    the attention they approximate."""
    for value in sorted({float(v) for v in np.atleast_1d(flops) if np.isfinite(v) and v > 0}):
        ax.axvline(value, color=color("softmax"), linestyle="-.", linewidth=1.2, zorder=1)
        ax.annotate(text, (value, 1), xycoords=("data", "axes fraction"), rotation=90, xytext=(-11, -4),
                    textcoords="offset points", va="top", ha="left", fontsize=8)


def softmax_cost_handle(text: str = "softmax's own cost (exact, rel_mse = 0)"):
    """The legend entry of :func:`mark_softmax_cost`'s line."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color("softmax"), linestyle="-.", linewidth=1.2, label=text)


def ratio_text(num: float, den: float, *, high: float | None = None, percent: bool = False) -> str:
    """``num / den`` for a caption, where both are non-negative quantities and ``num`` may be an unbiased estimate
    (a squared bias) that falls below 0: then it is not resolved from 0, and the text gives the bound from
    ``num``'s 95% upper limit ``high`` ("< 0.004 (not resolved from 0)") instead of a negative ratio. Percentages
    are clipped to 100%; a zero or non-finite ``den`` gives "n/a"."""
    if not (np.isfinite(den) and den > 0 and np.isfinite(num)):
        return "n/a"

    def show(r):
        if not percent:
            return f"{r:.3g}"
        r = min(r, 1.0)
        return "<1%" if 0 < r < 0.005 else f"{r:.0%}"

    if num > 0:
        return show(num / den)
    if high is not None and np.isfinite(high) and high > 0:
        bound = show(high / den)
        return f"< {bound.lstrip('<')} (not resolved from 0)"
    return f"{show(0.0)} (not resolved from 0)"


def _values(frame: pd.DataFrame, column: str) -> str:
    values = sorted(frame[column].dropna().unique()) if column in frame.columns else []
    shown = [f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in values]
    return shown[0] if len(shown) == 1 else "{" + ", ".join(shown) + "}"


def sizes(frame: pd.DataFrame) -> str:
    """A caption fragment with the sizes of a sweep's rows: seq_len, d, batch, replicates (and norm)."""
    parts = [f"seq_len = {_values(frame, 'seq_len')}", f"d = {_values(frame, 'd')}"]
    if "batch" in frame.columns and frame["batch"].dropna().gt(1).any():
        parts.append(f"batch = {_values(frame, 'batch')}")
    if "norm" in frame.columns and frame["norm"].notna().any():
        parts.append(f"scaled norm |x| = |y| = {_values(frame, 'norm')}")
    if "mode" in frame.columns and frame["mode"].notna().any():
        parts.append(f"{_values(frame, 'mode')} keys")
    parts.append(f"{_values(frame, 'replicates')} replicates per cell")
    return ", ".join(parts)


def value_ticks(ax, values, axis: str = "x") -> None:
    """Ticks at ``values`` labelled with plain numbers (e.g. 64, 128, 256 on a log2 axis)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    values = sorted({float(v) for v in values if np.isfinite(v)})
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(values))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def tidy_log(ax) -> None:
    """Readable log axes: on an axis spanning under two decades, ticks at 1, 2, 5 x 10^k, or, when fewer than two
    of those fall inside (a sub-decade axis), at round linear steps (1.5e6, 2e6, 2.5e6); every label gives its
    tick's value (:func:`tick_label`); minor ticks are never labelled."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log" or not (lo > 0 and hi > 0):
            continue
        lo, hi = min(lo, hi), max(lo, hi)
        axis.set_minor_formatter(NullFormatter())
        if isinstance(axis.get_major_locator(), matplotlib.ticker.FixedLocator):
            continue
        if math.log10(hi / lo) < 2:
            decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            inside = [m * 10.0**e for e in decades for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)) if len(inside) >= 2
                                   else MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(tick_label))


def tick_label(value: float, _pos=None) -> str:
    """A log-axis tick label that gives the tick's value to three significant digits: a plain number between
    0.001 and 10^4 (0.05, 1.5, 2000), a power of ten or m x 10^k otherwise (10^6, 1.5 x 10^6)."""
    if not value > 0:
        return ""
    if 1e-3 <= value < 1e4:
        return f"{float(f'{value:.3g}'):g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = float(f"{value / 10**exponent:.3g}")
    if mantissa >= 10:  # 9.999e5 rounds to 10 x 10^5
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}\\times10^{{{exponent}}}$"
