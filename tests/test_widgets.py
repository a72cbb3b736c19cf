"""The interactive explorer runs headless (build, update programmatically, read its numbers and plot), and
the result objects print short summaries, never tensors."""
import pytest
import torch

import evalab as ev
from conftest import make_qkv

widgets = pytest.importorskip("ipywidgets")
from evalab.report.widgets import explore  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_explorer_headless_matches_a_direct_measurement():
    ex = explore(replicates=8)
    ex.update(estimator="EVA", window=8, chunk_size=4, seq_len=32, norm=1.5, query=5)
    q, k, v, scale = ex.inputs()
    assert q.shape == (32, 32)
    direct = ev.monte_carlo(ev.EVA(window=8, chunk_size=4, scale=scale), q, k, v, replicates=8, seed=0, matrix=False)
    for name in ("rel_error", "rel_mse", "rel_bias2", "rel_variance"):
        assert ex.result.metrics[name].value == direct.metrics[name].value
        assert f"{direct.metrics[name].value:.4g}" in ex.table.value
    assert ex.plot.value[:8] == PNG_MAGIC
    exact_line = ex.figure.axes[0].lines[0].get_ydata()  # the exact softmax row of query 5
    reference = torch.softmax(scale * q[5] @ k.T, dim=-1)
    torch.testing.assert_close(torch.as_tensor(exact_line), reference, rtol=1e-5, atol=1e-7)
    ex.update(seq_len=64)  # the query slider follows seq_len
    assert ex.controls["query"].max == 63 and ex.result.sizes["seq_len"] == 64


def test_explorer_reports_invalid_combinations_and_every_menu_entry_runs():
    ex = explore(replicates=4)
    ex.update(estimator="EVA", window=8, chunk_size=16, seq_len=32)
    assert ex.result is None and "window=8 must be a multiple of chunk_size=16" in ex.table.value
    ex.update(chunk_size=4)
    for entry in ex.controls["estimator"].options:
        ex.update(estimator=entry)
        assert ex.result is not None, (entry, ex.table.value)
    with pytest.raises(ValueError, match="no control 'colour'"):
        ex.update(colour="red")


def test_reprs_are_short():
    q, k, v = make_qkv(N=64, d=4, dv=3)
    rfa = ev.RFA(num_features=16)
    draw = rfa.draw(q, k, replicates=500, generator=0)
    assert repr(draw) == "Draw(kind='omega:iid', shape=(500, 16, 4), dtype=float64, device=cpu)"
    res = ev.monte_carlo(rfa, q, k, v, replicates=16)
    cmp = ev.compare({"RFA": rfa, "EVA": ev.EVA(window=8, chunk_size=4)}, q, k, v, replicates=16)
    att = ev.key_variance(q, k, v, num_features=4, chunk_size=8, replicates=4)
    for obj, lines in ((res, 20), (cmp, 8), (att, 1)):
        text = repr(obj)
        assert "tensor(" not in text and "array(" not in text and len(text.splitlines()) <= lines, text
    assert repr(att).startswith("Attribution(replicates=4, shape=(64, 64), mean variance: shared ")
