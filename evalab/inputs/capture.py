"""Capture the q, k, v (and logit scale) that a pretrained model's attention layers use, via forward hooks.

    cap = capture(model, input_ids)        # one forward pass, no gradients
    q, k, v = cap[0]                       # layer 0: (*batch, heads, N, d_head)
    q, k, v = cap[0, 3]                    # layer 0, head 3: (*batch, N, d_head)
    ev.softmax_attention(q, k, v, scale=cap[0].scale)   # the layer's attention output for that head

Supported attention modules:
- Hugging Face BERT-style self-attention (transformers' BertSelfAttention, RobertaSelfAttention, ...): a module
  with ``nn.Linear`` children ``query``, ``key``, ``value`` and int attributes ``num_attention_heads`` and
  ``attention_head_size``. The projections' outputs are recorded as computed; scale = the module's ``scaling``
  if it has one, else attention_head_size**-0.5.
- ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate q/k/v projection weights, either
  ``batch_first``): its query/key/value inputs are projected with the module's own weights (``bias_k``/``bias_v``
  and ``add_zero_attn`` append their extra key/value row as the module does); scale = head_dim**-0.5.

Masks are out of scope: the captured q/k/v are the unmasked projections. A layer that received an attention
mask or padding mask (or is causal) is flagged with ``info["masked"] = True``; plain softmax attention of its
q/k/v then differs from what the model computed at the masked positions. Cached keys/values (incremental
decoding) and relative-position logit terms are not supported either.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .qkv import QKV

LOOKS_FOR = (
    "torch.nn.MultiheadAttention, or BERT-style self-attention (a module with nn.Linear children "
    "'query', 'key', 'value' and int attributes 'num_attention_heads', 'attention_head_size', such as "
    "transformers' BertSelfAttention)"
)


@dataclass(frozen=True)
class Captured:
    """The attention inputs of every attention layer call of one forward pass, in call order.

    ``cap[layer]`` (an int, or a name from ``layers``) is a QKV with q (*batch, heads, N, d_head),
    k, v (*batch, heads, M, d_head); ``cap[layer, head]`` drops the head dimension. ``len(cap)`` counts layers,
    iteration yields the per-layer QKVs, ``output`` is what the model returned.
    """

    layers: tuple[str, ...]
    qkv: tuple[QKV, ...]
    model: str
    output: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.qkv)

    def __iter__(self) -> Iterator[QKV]:
        return iter(self.qkv)

    def _layer_index(self, layer: object) -> int:
        if isinstance(layer, str):
            if layer not in self.layers:
                raise KeyError(f"layer={layer!r} is not a captured layer; expected one of {', '.join(map(repr, self.layers))}")
            return self.layers.index(layer)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int index or a layer name (str), got {layer!r} ({type(layer).__name__})")
        if not -len(self) <= layer < len(self):
            raise IndexError(f"layer={layer} is out of range for {len(self)} captured layers")
        return layer % len(self)

    def __getitem__(self, index: object) -> QKV:
        if isinstance(index, tuple):
            if len(index) != 2:
                raise TypeError(f"index must be layer or (layer, head), got {index!r}")
            layer, head = index
        else:
            layer, head = index, None
        item = self.qkv[self._layer_index(layer)]
        if head is None:
            return item
        heads = item.info["heads"]
        if isinstance(head, bool) or not isinstance(head, int):
            raise TypeError(f"head must be an int, got {head!r} ({type(head).__name__})")
        if not -heads <= head < heads:
            raise IndexError(f"head={head} is out of range for a layer with {heads} heads")
        head %= heads
        pick = lambda t: t.select(-3, head)
        return QKV(pick(item.q), pick(item.k), pick(item.v), item.scale, {**item.info, "head": head})

    def stack(self) -> QKV:
        """All layers in one QKV: q (layers, *batch, heads, N, d_head); layers must agree in shape and scale."""
        first = self.qkv[0]
        for item in self.qkv[1:]:
            if item.q.shape != first.q.shape or item.k.shape != first.k.shape or item.v.shape != first.v.shape:
                raise ValueError(
                    f"cannot stack layers of different shapes: {first.info['layer_name']!r} has q {tuple(first.q.shape)}, "
                    f"k {tuple(first.k.shape)}, v {tuple(first.v.shape)}; {item.info['layer_name']!r} has q "
                    f"{tuple(item.q.shape)}, k {tuple(item.k.shape)}, v {tuple(item.v.shape)}"
                )
            if item.scale != first.scale:
                raise ValueError(
                    f"cannot stack layers with different scales: {first.info['layer_name']!r} has {first.scale}, "
                    f"{item.info['layer_name']!r} has {item.scale}"
                )
        stacked = [torch.stack([getattr(item, name) for item in self.qkv]) for name in ("q", "k", "v")]
        info = {
            "model": self.model,
            "layers": self.layers,
            "heads": first.info["heads"],
            "seq_len": first.info["seq_len"],
            "scale": first.scale,
            "masked": any(item.info["masked"] for item in self.qkv),
        }
        return QKV(*stacked, first.scale, info)

    def __repr__(self) -> str:
        shape = tuple(self.qkv[0].q.shape) if self.qkv else ()
        return f"Captured(model={self.model!r}, layers={len(self)}, q[0]={shape}, scale={self.qkv[0].scale:.4g})"


def _int_attr(module: nn.Module, name: str) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(module: nn.Module) -> str | None:
    """'mha', 'bert' or None for an unsupported module."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    children = dict(module.named_children())
    if (
        all(isinstance(children.get(name), nn.Linear) for name in ("query", "key", "value"))
        and _int_attr(module, "num_attention_heads")
        and _int_attr(module, "attention_head_size")
    ):
        return "bert"
    return None


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """A forward argument given by position or by name (None when absent)."""
    return args[index] if len(args) > index else kwargs.get(name)


def _split_heads(t: torch.Tensor, heads: int, head_dim: int, what: str, layer: str) -> torch.Tensor:
    """(*b, L, heads * head_dim) -> (*b, heads, L, head_dim)."""
    if t.shape[-1] != heads * head_dim:
        raise ValueError(
            f"layer {layer!r}: {what} projection has {t.shape[-1]} features, expected heads * head_dim = "
            f"{heads} * {head_dim}"
        )
    return t.unflatten(-1, (heads, head_dim)).transpose(-3, -2).contiguous()


def _mha_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict, name: str) -> dict:
    """q, k, v (*b, heads, L, head_dim) as MultiheadAttention computes them from its query/key/value inputs."""
    query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if query.dim() == 3 and not module.batch_first:  # (L, B, E) -> (B, L, E)
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    if module.bias_k is not None:  # one extra learned key/value position, appended before the head split
        k = torch.cat([k, module.bias_k.reshape(E).expand(*k.shape[:-2], 1, E)], dim=-2)
        v = torch.cat([v, module.bias_v.reshape(E).expand(*v.shape[:-2], 1, E)], dim=-2)
    heads, head_dim = module.num_heads, module.head_dim
    q, k, v = (_split_heads(t, heads, head_dim, w, name) for t, w in ((q, "query"), (k, "key"), (v, "value")))
    if module.add_zero_attn:  # one extra all-zero key/value position, appended after the head split
        k = torch.cat([k, k.new_zeros(*k.shape[:-2], 1, head_dim)], dim=-2)
        v = torch.cat([v, v.new_zeros(*v.shape[:-2], 1, head_dim)], dim=-2)
    masked = (
        _arg(args, kwargs, 3, "key_padding_mask") is not None
        or _arg(args, kwargs, 5, "attn_mask") is not None
        or bool(_arg(args, kwargs, 7, "is_causal"))
    )
    return {"q": q, "k": k, "v": v, "heads": heads, "head_dim": head_dim, "scale": head_dim**-0.5, "masked": masked}


def _bert_scale(module: nn.Module) -> float:
    scaling = getattr(module, "scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling) and scaling > 0:
        return float(scaling)
    return module.attention_head_size**-0.5


class _Recorder:
    """Forward hooks that fill one record per attention-module call."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.active: dict[int, dict] = {}  # id(attention module) -> record of the call in progress
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, name: str, module: nn.Module, kind: str) -> None:
        if kind == "mha":
            def pre(mod, args, kwargs):
                self.records.append({"name": name, "module": type(mod).__name__, **_mha_inputs(mod, args, kwargs, name)})
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            return

        position = getattr(module, "position_embedding_type", "absolute")
        if position not in (None, "absolute"):
            raise ValueError(
                f"layer {name!r} uses position_embedding_type={position!r}, which adds relative-position terms to "
                f"the logits that q and k alone do not give; expected 'absolute'"
            )

        def pre(mod, args, kwargs):
            masked = _arg(args, kwargs, 1, "attention_mask") is not None or bool(getattr(mod, "is_causal", False))
            record = {
                "name": name, "module": type(mod).__name__, "heads": mod.num_attention_heads,
                "head_dim": mod.attention_head_size, "scale": _bert_scale(mod), "masked": masked,
            }
            self.records.append(record)
            self.active[id(mod)] = record

        def post(mod, args, output):
            self.active.pop(id(mod), None)

        def projection(role):
            def hook(linear, args, output):
                record = self.active.get(id(module))
                if record is not None:  # ignore calls of the Linear outside its attention module's forward
                    record[role] = _split_heads(output.detach(), record["heads"], record["head_dim"], role, name)
            return hook

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post))
        for role, child in (("q", module.query), ("k", module.key), ("v", module.value)):
            self.handles.append(child.register_forward_hook(projection(role)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.active.clear()


def capture(model: nn.Module, /, *args: Any, **kwargs: Any) -> Captured:
    """Run ``model(*args, **kwargs)`` once (eval mode, no gradients) and record each attention layer's q, k, v.

    Returns a Captured: ``cap[layer]`` is a QKV with q (*batch, heads, N, d_head), k and v
    (*batch, heads, M, d_head) and the layer's logit scale; info holds model, layer, layer_name, module, head,
    heads, seq_len, key_len, scale and masked. A module called several times in one pass (shared weights)
    gives one layer per call, named 'name#0', 'name#1', ... The modules' training flags and hooks are restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, module, kind) for name, module in model.named_modules() if (kind := _kind(module))]
    if not targets:
        raise ValueError(f"capture found no supported attention module in {type(model).__name__}; it looks for {LOOKS_FOR}")
    recorder = _Recorder()
    training = [(module, module.training) for module in model.modules()]
    try:
        for name, module, kind in targets:
            recorder.attach(name or type(module).__name__, module, kind)
        model.eval()
        with torch.no_grad():
            output = model(*args, **kwargs)
    finally:
        recorder.remove()
        for module, flag in training:
            module.training = flag
    records = recorder.records
    if not records:
        raise ValueError(
            f"no attention layer of {type(model).__name__} ran during the forward pass "
            f"(found {len(targets)} supported modules: {', '.join(repr(t[0]) for t in targets[:4])}"
            f"{', ...' if len(targets) > 4 else ''})"
        )
    calls = Counter(record["name"] for record in records)
    seen: Counter = Counter()
    names, items = [], []
    model_name = type(model).__name__
    for index, record in enumerate(records):
        name = record["name"]
        if calls[name] > 1:
            name = f"{name}#{seen[record['name']]}"
            seen[record["name"]] += 1
        missing = [role for role in ("q", "k", "v") if role not in record]
        if missing:
            raise ValueError(
                f"layer {name!r} did not compute its {'/'.join(missing)} projection during the forward pass "
                "(cached keys/values are not supported)"
            )
        q, k, v = record["q"], record["k"], record["v"]
        info = {
            "model": model_name, "layer": index, "layer_name": name, "module": record["module"], "head": None,
            "heads": record["heads"], "seq_len": q.shape[-2], "key_len": k.shape[-2], "scale": record["scale"],
            "masked": record["masked"],
        }
        names.append(name)
        items.append(QKV(q, k, v, record["scale"], info))
    return Captured(tuple(names), tuple(items), model_name, output)
