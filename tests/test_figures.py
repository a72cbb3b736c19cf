"""The shared figure layer: variant names, one colour per variant in every figure, column checks, saving,
intervals and Pareto frontiers."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from evalab.report import figures as fg  # noqa: E402
from evalab.report.reproduce import discover, load_module  # noqa: E402


def row(estimator, **params):
    return {"estimator": estimator, "label": estimator, **params}


@pytest.mark.parametrize("params, expected", [
    (row("rfa", feature_map="positive", sampler="iid"), "RFA iid"),
    (row("rfa", feature_map="positive", sampler="orthogonal"), "RFA orthogonal"),
    (row("rfa", feature_map="positive", sampler="qmc"), "RFA qmc"),
    (row("rfa", feature_map="hyperbolic", sampler="iid"), "RFA hyperbolic"),
    (row("rfa", feature_map="hyperbolic", sampler="orthogonal"), "RFA hyperbolic orthogonal"),
    (row("rfa", feature_map="trig", sampler="iid"), "RFA trig"),
    (row("eva", window=32, chunk_size=8), "EVA"),
    (row("eva", window=32, chunk_size=0), "local window"),
    (row("eva", window=0, chunk_size=8), "EVA (no window)"),
    (row("softmax"), "softmax"),
    (row("control_variates", coefficient="chunked"), "CV chunked"),
    ({**row("rfa", feature_map="positive", sampler="iid"), "label": "RFA"}, "RFA iid"),  # a family label splits
    ({**row("eva", window=32, chunk_size=8), "label": "EVA zero proposal"}, "EVA zero proposal"),  # specific label
    ({"estimator": "rfa", "feature_map": "positive", "sampler": "qmc", "label": float("nan")}, "RFA qmc"),
])
def test_variant_names(params, expected):
    assert fg.variant(params) == expected
    assert fg.variant(pd.Series(params)) == expected


def test_with_variant_and_order():
    frame = pd.DataFrame([row("eva", window=32, chunk_size=0), row("rfa", feature_map="positive", sampler="qmc"),
                          row("rfa", feature_map="positive", sampler="iid"), {"estimator": "mine", "label": "zzz"}])
    out = fg.with_variant(frame)
    assert list(out["variant"]) == ["local window", "RFA qmc", "RFA iid", "zzz"]
    assert "variant" not in frame.columns  # a copy
    assert [name for name, _ in fg.by_variant(out)] == ["RFA iid", "RFA qmc", "local window", "zzz"]


def test_colours_are_distinct_and_fixed_across_runs():
    """Known variants have distinct colours; unknown labels get a colour and marker from a hash that does not
    change between processes (pinned here, unlike Python's salted hash())."""
    colours = [fg.color(n) for n in fg.VARIANTS]
    assert len(set(colours)) == len(colours)
    assert fg.color("unknown variant") == fg.color("unknown variant")  # stable for labels outside VARIANTS
    assert (fg.color("unknown variant"), fg.marker("unknown variant")) == ("#843c39", ">")
    assert fg.color("unknown variant") not in colours
    assert fg.palette(["EVA", "RFA iid"]) == {"RFA iid": fg.color("RFA iid"), "EVA": fg.color("EVA")}


def _legend_colours(fig) -> dict[str, str]:
    colours = {}
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            if hasattr(handle, "get_color"):
                colours[text.get_text()] = to_hex(handle.get_color())
    return colours


def _synthetic_sweep(norms=(1.0,)):
    """Rows shaped like sweep rows: RFA iid/orthogonal over num_features, EVA over chunk_size, local window."""
    rows = []
    for norm in norms:
        for sampler in ("iid", "orthogonal"):
            for s in (8, 16, 32):
                rows.append(row("rfa", feature_map="positive", sampler=sampler, num_features=s, window=np.nan,
                                chunk_size=np.nan, flops=1000.0 * s, rel_mse=1.0 / s, norm=norm))
        for c in (4, 8):
            rows.append(row("eva", feature_map=None, sampler=None, num_features=np.nan, window=32, chunk_size=c,
                            flops=20000.0 / c, rel_mse=0.1 * c, norm=norm))
        rows.append(row("eva", feature_map=None, sampler=None, num_features=np.nan, window=16, chunk_size=0,
                        flops=500.0, rel_mse=3.0, norm=norm))
    frame = pd.DataFrame(rows)
    frame["samples_per_chunk"] = 1
    for m in ("rel_mse", "rel_variance", "rel_bias2"):
        frame[m] = frame["rel_mse"] if m == "rel_mse" else frame["rel_mse"] * (0.9 if m == "rel_variance" else 0.05)
        frame[f"{m}_low"], frame[f"{m}_high"] = frame[m] * 0.8, frame[m] * 1.2
    return frame.assign(seq_len=64, d=16, replicates=8)


def test_same_variant_same_colour_in_two_figures():
    """F1 and F6 (and F3) draw "RFA iid" and "EVA" in the palette's colours, through their figure legends."""
    folders = {f.name[:3]: f for f in discover()}
    sweep = _synthetic_sweep()
    theory = pd.DataFrame({"estimator": "rfa", "feature_map": "positive", "sampler": "iid", "num_features": [8, 16, 32],
                           "rel_mse_predicted": [0.12, 0.06, 0.03]})
    frames = {"f01": {"sweep": sweep, "theory": theory}, "f06": {"sweep": sweep}, "f03": {"sweep": sweep}}
    seen = []
    for key, tables in frames.items():
        module = load_module(folders[key])
        with fg.style():
            fig = module.plot(tables)
        seen.append(_legend_colours(fig))
        plt.close(fig)
    for name in ("RFA iid", "RFA orthogonal", "EVA", "local window"):
        expected = to_hex(fg.color(name))
        assert [colours.get(name) for colours in seen] == [expected] * len(seen), name


def test_require_columns_names_figure_and_missing_columns():
    frame = pd.DataFrame({"a": [1], "b": [2]})
    fg.require_columns(frame, ["a", "b"], "F9")
    with pytest.raises(ValueError, match=r"F9: the frame lacks required columns 'c', 'd' \(it has 2 columns: a, b\)"):
        fg.require_columns(frame, ["a", "c", "d"], "F9")
    with pytest.raises(TypeError, match="F9: expected a pandas DataFrame, got dict"):
        fg.require_columns({"a": [1]}, ["a"], "F9")
    with pytest.raises(ValueError, match="F9: missing table 'rows' \\(got tables: 'other'\\)"):
        fg.require_frame({"other": frame}, "rows", ["a"], "F9")
    with pytest.raises(ValueError, match="F9: table 'rows' has no rows"):
        fg.require_frame({"rows": frame.iloc[:0]}, "rows", ["a"], "F9")


def test_save_writes_png_and_pdf(tmp_path):
    with fg.style():
        fig, ax = plt.subplots()
        frame = pd.DataFrame({"x": [1, 2, 4], "y": [1.0, 0.5, 0.25], "y_low": [0.8, 0.4, 0.2], "y_high": [1.2, 0.6, 0.3]})
        ax.set_yscale("log")
        fg.errorbar(ax, frame, "x", "y", "RFA iid")
        fg.band(ax, frame, "x", "y", "EVA")
        fg.tidy_log(ax)
    paths = fg.save(fig, tmp_path / "out", "demo")
    plt.close(fig)
    assert [p.name for p in paths] == ["demo.png", "demo.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    again = fg.save(fig, tmp_path / "again", "demo")  # no timestamps: same bytes for the same figure
    assert again[1].read_bytes() == paths[1].read_bytes()


def test_errorbar_draws_the_interval_in_the_variant_colour():
    fig, ax = plt.subplots()
    frame = pd.DataFrame({"x": [2, 1], "y": [0.5, 1.0], "y_low": [0.4, -0.1], "y_high": [0.7, 1.5]})
    ax.set_yscale("log")
    container = fg.errorbar(ax, frame, "x", "y", "RFA qmc")
    line = container.lines[0]
    assert list(line.get_xdata()) == pytest.approx([1, 2], abs=1e-12)  # the frame's x values, sorted by x
    assert to_hex(line.get_color()) == fg.color("RFA qmc") and line.get_marker() == fg.marker("RFA qmc")
    low, high = fg.interval(frame.sort_values("x"), "y")
    assert list(low) == pytest.approx([-0.1, 0.4], abs=1e-12) and list(high) == pytest.approx([1.5, 0.7], abs=1e-12)
    segments = container.lines[2][0].get_segments()
    # a lower bound <= 0 cannot be drawn on a log axis: the bar goes down to y / 100 instead
    assert segments[0][0][1] == pytest.approx(0.01) and segments[0][1][1] == pytest.approx(1.5)
    assert segments[1][0][1] == pytest.approx(0.4) and segments[1][1][1] == pytest.approx(0.7)
    plt.close(fig)


def test_pareto_front():
    frame = pd.DataFrame({"flops": [1, 2, 3, 4, 5, 6], "rel_mse": [5.0, 6.0, 3.0, 3.0, np.nan, 1.0]})
    front = fg.pareto_front(frame, "flops", "rel_mse")
    assert list(front["flops"]) == [1, 3, 6] and list(front["rel_mse"]) == pytest.approx([5, 3, 1], abs=1e-12)


def test_sizes_caption_fragment():
    frame = pd.DataFrame({"seq_len": [64, 128], "d": [16, 16], "norm": [0.5, 1.0], "replicates": [8, 8],
                          "batch": [1, 1]})
    assert fg.sizes(frame) == "seq_len = {64, 128}, d = 16, scaled norm |x| = |y| = {0.5, 1}, 8 replicates per cell"


def _label_value(text: str) -> float:
    """The number a tick label states: "0.05", "$2\\times10^{6}$", "$10^{-4}$", "$1.5\\times10^{6}$"."""
    import re

    text = text.strip("$")
    power = re.fullmatch(r"(?:([\d.]+)\\times)?10\^\{(-?\d+)\}", text)
    if power:
        return float(power.group(1) or 1) * 10.0 ** int(power.group(2))
    return float(text)


@pytest.mark.parametrize("limits", [(1.3e6, 2.7e6), (1.1e6, 9e6), (0.03, 0.5), (1.2, 1.9), (2.7e-4, 1.3e-4)])
def test_tidy_log_labels_give_each_tick_its_value(limits):
    """On sub-decade and sub-two-decade log axes every major tick's label states its own value (3 significant
    digits), labels are distinct, and at least two ticks are labelled; 1.5e6, 2e6 and 2.5e6 used to read 2x10^6."""
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(*limits)
    fg.tidy_log(ax)
    fig.canvas.draw()
    lo, hi = sorted(limits)
    ticks = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    plt.close(fig)
    assert len(ticks) >= 2 and len({text for _, text in ticks}) == len(ticks)
    for value, text in ticks:
        assert _label_value(text) == pytest.approx(value, rel=5e-3), (value, text)


def test_tick_label_values():
    assert fg.tick_label(2.5e6) == "$2.5\\times10^{6}$" and fg.tick_label(1e6) == "$10^{6}$"
    assert fg.tick_label(0.05) == "0.05" and fg.tick_label(0.1 + 1.1) == "1.2"  # 0.1 + 1.1 is just above 1.2
    assert fg.tick_label(9.9996e5) == "$10^{6}$"  # rounds up into the next decade
    assert fg.tick_label(0) == "" and fg.tick_label(-1.0) == ""


def test_softmax_flops_matches_the_cost_model():
    """Exact softmax on (batch, N, d) x (batch, M, d) x (batch, M, dv): N M (2 d + 2 dv + 4) FLOPs per batch element."""
    frame = pd.DataFrame({"seq_len": [128, 64], "key_len": [128, 32], "d": [32, 16], "dv": [32, 8], "batch": [1, 12]})
    expected = [128 * 128 * (2 * 32 + 2 * 32 + 4), 12 * 64 * 32 * (2 * 16 + 2 * 8 + 4)]
    assert list(fg.softmax_flops(frame)) == pytest.approx(expected, rel=1e-12)
    plain = pd.DataFrame({"seq_len": [16], "d": [4]})  # key_len, dv and batch default to seq_len, d and 1
    assert fg.softmax_flops(plain)[0] == pytest.approx(16 * 16 * (2 * 4 + 2 * 4 + 4), rel=1e-12)
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    fg.mark_softmax_cost(ax, [2e6, 2e6, np.nan])
    assert [line.get_xdata()[0] for line in ax.lines] == pytest.approx([2e6], rel=1e-12)  # one per distinct finite value
    plt.close(fig)


def test_ratio_text_never_prints_an_impossible_value():
    assert fg.ratio_text(0.2, 0.4) == "0.5" and fg.ratio_text(0.2, 0.4, percent=True) == "50%"
    assert fg.ratio_text(-0.01, 2.0, high=0.008) == "< 0.004 (not resolved from 0)"
    assert fg.ratio_text(-0.01, 2.0, high=0.001, percent=True) == "< 1% (not resolved from 0)"
    assert fg.ratio_text(-0.01, 2.0) == "0 (not resolved from 0)"
    assert fg.ratio_text(3.0, 2.0, percent=True) == "100%"  # a share is clipped at 100%
    assert fg.ratio_text(0.001, 2.0, percent=True) == "<1%"
    assert fg.ratio_text(1.0, 0.0) == "n/a" and fg.ratio_text(np.nan, 1.0) == "n/a"
