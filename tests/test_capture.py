"""evalab.inputs.capture: captured q/k/v equal hand projections and reproduce each layer's attention output."""
import math

import pytest
import torch
from torch import nn

import evalab as ev
from evalab.inputs import Captured, capture


def hooks(model: nn.Module) -> dict:
    """The forward (pre-)hooks on every submodule (transformers registers some of its own)."""
    return {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- Hugging Face BERT


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).double().eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))


def contexts(model, ids):
    """Hidden states fed to each layer and each self-attention module's context output (before its output dense)."""
    outputs = []
    handles = [
        layer.attention.self.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
        for layer in model.encoder.layer
    ]
    try:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return hidden, outputs


def test_bert_qkv_equal_hand_projections(bert, ids):
    cap = capture(bert, ids)
    hidden, _ = contexts(bert, ids)
    assert isinstance(cap, Captured) and len(cap) == 2
    assert cap.layers == ("encoder.layer.0.attention.self", "encoder.layer.1.attention.self")
    for i, (item, layer) in enumerate(zip(cap, bert.encoder.layer)):
        attn = layer.attention.self
        for name, linear in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            by_hand = hidden[i] @ linear.weight.T + linear.bias               # (2, 11, 32)
            by_hand = by_hand.reshape(2, 11, 4, 8).permute(0, 2, 1, 3)     # (2, 4, 11, 8)
            torch.testing.assert_close(getattr(item, name), by_hand, rtol=0, atol=1e-12)
        assert item.scale == pytest.approx(1 / math.sqrt(8))
        assert item.info == {
            "model": "BertModel", "layer": i, "layer_name": cap.layers[i], "module": "BertSelfAttention",
            "head": None, "heads": 4, "seq_len": 11, "key_len": 11, "scale": item.scale, "masked": False,
        }


def test_bert_captured_attention_reproduces_context(bert, ids):
    cap = capture(bert, ids)
    _, outputs = contexts(bert, ids)
    for item, context in zip(cap, outputs):
        q, k, v = item
        heads = ev.softmax_attention(q, k, v, scale=item.scale)            # (2, 4, 11, 8)
        torch.testing.assert_close(heads.transpose(1, 2).reshape(2, 11, 32), context, rtol=0, atol=1e-10)
        for h in range(4):  # one head at a time, through cap[layer, head]
            one = cap[item.info["layer"], h]
            assert one.q.shape == (2, 11, 8) and one.info["head"] == h
            torch.testing.assert_close(ev.softmax_attention(*one, scale=one.scale), context[..., 8 * h: 8 * h + 8], rtol=0, atol=1e-10)


def test_bert_float32_precision(bert, ids):
    model32 = type(bert)(bert.config)
    model32.load_state_dict(bert.state_dict())
    model32 = model32.float().eval()
    cap = capture(model32, ids)
    _, outputs = contexts(model32, ids)
    assert cap[0].q.dtype == torch.float32
    for item, context in zip(cap, outputs):
        heads = ev.softmax_attention(*item, scale=item.scale).transpose(1, 2).reshape(2, 11, 32)
        torch.testing.assert_close(heads, context, rtol=0, atol=1e-5)


def test_bert_indexing_mode_and_hooks_restored(bert, ids):
    bert.train()
    bert.encoder.layer[0].eval()  # mixed modes come back as they were
    before = hooks(bert)
    try:
        cap = capture(bert, input_ids=ids)  # keyword arguments reach the model
        assert bert.training and not bert.encoder.layer[0].training and bert.encoder.layer[1].training
        assert hooks(bert) == before
        assert cap[-1] is cap[1] and cap["encoder.layer.1.attention.self"] is cap[1]
        assert cap[1, -1].info["head"] == 3
        torch.testing.assert_close(cap[1, 2].k, cap[1].k[:, 2])
        assert isinstance(cap.output.last_hidden_state, torch.Tensor)
        stacked = cap.stack()
        assert stacked.q.shape == (2, 2, 4, 11, 8) and stacked.info["layers"] == cap.layers
        with pytest.raises(IndexError, match="layer=2"):
            cap[2]
        with pytest.raises(IndexError, match="head=4"):
            cap[0, 4]
        with pytest.raises(KeyError, match="encoder.layer.0.attention.self"):
            cap["nope"]
        with pytest.raises(TypeError, match="layer"):
            cap[0.5]
        # a forward that fails still removes the hooks and restores the modes
        with pytest.raises(IndexError):
            capture(bert, torch.full((1, 3), 1000))
        assert hooks(bert) == before and bert.training and not bert.encoder.layer[0].training
    finally:
        bert.eval()


def test_bert_padding_mask_is_flagged(bert, ids):
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    assert all(item.info["masked"] for item in capture(bert, ids, attention_mask=mask))


# ---------------------------------------------------------------- BERT-style modules written by hand


class TinySelfAttention(nn.Module):
    """BERT-style self-attention without a ``scaling`` attribute: scale must be head_size**-0.5."""

    def __init__(self, hidden=12, heads=3, position_embedding_type="absolute"):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.position_embedding_type = position_embedding_type

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.num_attention_heads, -1)).transpose(-3, -2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), dim=-1)
        return (weights @ v).transpose(-3, -2).flatten(-2)


class Shared(nn.Module):
    """One attention module applied twice (shared weights, as in ALBERT)."""

    def __init__(self):
        super().__init__()
        self.attn = TinySelfAttention()

    def forward(self, x):
        return self.attn(self.attn(x))


def test_bert_style_module_shared_weights():
    torch.manual_seed(0)
    model = Shared().double()
    x = torch.randn(5, 12, dtype=torch.float64)  # unbatched: (N, hidden)
    cap = capture(model, x)
    assert cap.layers == ("attn#0", "attn#1")
    assert cap[0].scale == pytest.approx(0.5) and cap[0].info["module"] == "TinySelfAttention"
    first = model.attn(x)
    torch.testing.assert_close(ev.softmax_attention(*cap[0], scale=cap[0].scale).transpose(0, 1).flatten(-2), first, rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.softmax_attention(*cap[1], scale=cap[1].scale).transpose(0, 1).flatten(-2), model.attn(first), rtol=0, atol=1e-12)
    # the root module itself may be the attention module
    root = capture(model.attn, x)
    assert root.layers == ("TinySelfAttention",)
    torch.testing.assert_close(root[0].q, cap[0].q)


def test_relative_position_logits_are_rejected():
    model = TinySelfAttention(position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        capture(model, torch.randn(4, 12))
    assert no_hooks(model)


# ---------------------------------------------------------------- torch.nn.MultiheadAttention


def mha_reference(module, cap_item, batch_first):
    """Captured q/k/v -> softmax attention -> merge heads -> out_proj, in the module's layout."""
    heads = ev.softmax_attention(*cap_item, scale=cap_item.scale)  # (B, H, N, dh)
    merged = heads.transpose(-3, -2).flatten(-2)                   # (B, N, E)
    out = module.out_proj(merged)
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["packed", "kdim", "bias_kv"])
def test_mha_reproduces_output(batch_first, variant):
    torch.manual_seed(0)
    options = {"packed": {}, "kdim": {"kdim": 6, "vdim": 10}, "bias_kv": {"add_bias_kv": True, "add_zero_attn": True}}[variant]
    module = nn.MultiheadAttention(16, 4, batch_first=batch_first, dropout=0.5, **options).double()
    with torch.no_grad():  # non-zero biases (torch initialises in_proj_bias to zero)
        for name, p in module.named_parameters():
            if "bias" in name:
                p.normal_()
    B, N, M = 3, 7, 9
    kdim, vdim = options.get("kdim", 16), options.get("vdim", 16)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, N, 16, generator=g, dtype=torch.float64)
    key = torch.randn(B, M, kdim, generator=g, dtype=torch.float64)
    value = torch.randn(B, M, vdim, generator=g, dtype=torch.float64)
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    cap = capture(module, query, key, value=value, need_weights=False)
    assert module.training and no_hooks(module)  # nn.Module starts in training mode; capture restored it
    item = cap[0]
    extra = 2 if variant == "bias_kv" else 0
    assert item.q.shape == (B, 4, N, 4) and item.k.shape == (B, 4, M + extra, 4) and item.v.shape == (B, 4, M + extra, 4)
    assert item.scale == pytest.approx(0.5, rel=1e-15) and item.info["seq_len"] == N and item.info["key_len"] == M + extra
    assert item.info["model"] == "MultiheadAttention" and not item.info["masked"]
    # q by hand from the module's weights
    wq = module.in_proj_weight[:16] if variant != "kdim" else module.q_proj_weight
    q_in = query if batch_first else query.transpose(0, 1)
    by_hand = (q_in @ wq.T + module.in_proj_bias[:16]).reshape(B, N, 4, 4).transpose(1, 2)
    torch.testing.assert_close(item.q, by_hand, rtol=0, atol=1e-12)
    with torch.no_grad():
        expected = module.eval()(query, key, value, need_weights=False)[0]
    torch.testing.assert_close(mha_reference(module, item, batch_first), expected, rtol=0, atol=1e-10)


def test_mha_unbatched_and_masks_flagged():
    torch.manual_seed(0)
    module = nn.MultiheadAttention(8, 2).double()
    x = torch.randn(5, 8, dtype=torch.float64)  # unbatched (N, E)
    cap = capture(module, x, x, x)
    assert cap[0].q.shape == (2, 5, 4)
    with torch.no_grad():
        expected = module.eval()(x, x, x)[0]
    torch.testing.assert_close(module.out_proj(ev.softmax_attention(*cap[0], scale=cap[0].scale).transpose(0, 1).flatten(-2)), expected, rtol=0, atol=1e-12)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    assert capture(module, x, x, x, attn_mask=mask)[0].info["masked"]
    assert capture(module, x, x, x, key_padding_mask=torch.zeros(5, dtype=torch.bool))[0].info["masked"]


def test_transformer_encoder_layers_are_captured():
    """Hooks switch off the encoder layer's fused fast path, so every self-attention call is recorded."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    x = torch.randn(2, 6, 16)
    cap = capture(model, x)
    assert cap.layers == tuple(f"layers.{i}.self_attn" for i in range(3))
    first = model.layers[0].self_attn
    by_hand = (x @ first.in_proj_weight[:16].T + first.in_proj_bias[:16]).reshape(2, 6, 4, 4).transpose(1, 2)
    torch.testing.assert_close(cap[0].q, by_hand, rtol=0, atol=1e-5)
    with torch.no_grad():
        after_first = model.layers[0].eval()(x)
    second = model.layers[1].self_attn
    by_hand = (after_first @ second.in_proj_weight[16:32].T + second.in_proj_bias[16:32]).reshape(2, 6, 4, 4).transpose(1, 2)
    torch.testing.assert_close(cap[1].k, by_hand, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_no_attention_module_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no supported attention module in Sequential.*MultiheadAttention.*query"):
        capture(model, torch.randn(2, 4))
    assert no_hooks(model)


def test_attention_module_that_never_runs():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="no attention layer of Skips ran"):
        capture(Skips(), torch.randn(3, 4))


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        capture(lambda x: x, torch.randn(2))
