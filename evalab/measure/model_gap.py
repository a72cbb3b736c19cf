"""The model-level gap (docs/theory.md section 14): a pretrained model run with an estimator in place of its
softmax attention, measured downstream against the exact model.

    res = ev.model_gap(ev.RFA(num_features=64), texts=16, replicates=8)   # all-MiniLM-L6-v2, offline
    res                  # embedding_cosine, last_hidden_rel_error, neighbour_agreement, ... with 95% intervals
    res.to_frame()       # one tidy row; res.layer_frame(): hidden-state error after every layer
    ev.model_gap(ev.EVA(), texts=16, seq_len=512, split="heldout")   # 16 held-out passages of 512 tokens
    ev.model_gap({0: ev.Softmax(), 1: ev.RFA(), ...})               # one estimator per layer (a fitted bundle)

Substitution goes through transformers' own extension point: the attention function of this module is
registered as ``transformers.AttentionInterface`` implementation ``"evalab"`` (with sdpa's mask builder) and the
model is switched to it with ``model.set_attn_implementation`` for the duration of a run; weights and model code
are untouched. Any Hugging Face model whose attention goes through that interface (BERT, RoBERTa, GPT-2, ...)
works. ``torch.nn.MultiheadAttention`` calls its kernel directly, not through a registered interface, so
models built on it are not supported here.

Layers are numbered by the order of the attention calls in one forward pass. Texts run unpadded, one text per
forward pass (its replicates stacked as the batch), so no padding mask exists; a mask that hides keys the
estimator cannot hide (anything but a causal mask in a causal layer) is refused. Causal layers use the
estimator's ``causal=True`` variant. Noise: the estimator gets ``shared_noise=False`` when it has that field
(every head its own noise), and the noise of replicate r in layer l on text t comes from
``seeded_generator(seed, MODEL_PURPOSE, r, l, t)`` on the model's device (no host-to-device copy): results depend
on the seed and the device type only, not on how replicates are batched. One replicate is one forward pass of the model over every text with fresh noise in every layer.

The exact model runs once per text: its hidden states and the sizes of its attention calls (and, when the
per-call gap is asked for, its q, k, v) are kept in an in-process cache keyed by the model object, the version
counters of its parameters and the text's token ids (:func:`clear_exact_cache` empties it; at most
``EXACT_CACHE_BYTES``, least recently used first out). Every replicate, estimator and later call on the same
texts reuses them; changing the weights in place (training, ``load_state_dict``) bumps the version counters and
so misses the cache.

FLOPs (docs/theory.md section 15): every row carries ``flops`` (the estimator's cost model summed over the
substituted calls of one replicate: every text, layer and head), ``softmax_flops`` (exact softmax attention's
cost model over the same calls; with ``layers="all"``, the exact model's attention FLOPs) and
``flops_fraction`` = flops / softmax_flops.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import math
import re
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .. import _checks
from .cost import estimate_cost
from ..estimators.draw import Draw, seeded_generator
from ..estimators.softmax import Softmax
from .intervals import mean_interval
from .monte_carlo import monte_carlo
from .result import Result, estimator_columns
from ..estimators.registry import estimator_name, estimator_parameters

IMPLEMENTATION = "evalab"
MODEL_PURPOSE = 0x6D6F64  # "mod": keeps model-level noise apart from monte_carlo's streams
DEFAULT_TEXTS = 100
DEFAULT_PASSAGES = 16
EXACT_CACHE_BYTES = 2**30
METRICS = ("embedding_cosine", "embedding_cosine_worst", "last_hidden_rel_error", "neighbour_agreement",
           "similarity_spearman")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("evalab_model_gap", default=None)


# --- texts ------------------------------------------------------------------------------------------------


def default_texts(count: int | None = DEFAULT_TEXTS) -> list[str]:
    """The first ``count`` sentences (verses) of the shipped public-domain text (Genesis 1-4, 109 sentences);
    ``None`` gives all of them."""
    from ..inputs.minilm import default_text

    body = " ".join(line for line in default_text().splitlines() if line.strip() and not line.startswith("Genesis "))
    sentences = re.split(r"(?<=[.?!])\s+", body.strip())
    if count is None:
        return sentences
    _checks.integer("texts", count)
    if count > len(sentences):
        raise ValueError(f"texts={count} is more than the {len(sentences)} sentences of the shipped text")
    return sentences[:count]


# --- the registered attention function --------------------------------------------------------------------


@dataclass
class _Run:
    """What the registered attention function does during one forward pass (held in a context variable)."""

    estimator: object | None  # None: every call exact; a Mapping: layer index -> that layer's estimator
    layers: frozenset | None  # substituted layers; None = all (all of the Mapping's)
    seed: int
    text: int
    first_replicate: int
    fallback: Callable  # the model's own attention function
    record: list | None = None  # exact pass: (q, k, v, scaling, causal) per call
    calls: int = 0
    variants: dict = field(default_factory=dict)

    def estimator_for(self, layer: int):
        """The estimator of ``layer``, or None where the layer runs exactly."""
        if self.estimator is None or (self.layers is not None and layer not in self.layers):
            return None
        return layer_estimator(self.estimator, layer)


def layer_estimator(estimator, layer: int):
    """``estimator`` itself, or ``estimator[layer]`` for a per-layer Mapping (None when the layer has none)."""
    return estimator.get(layer) if isinstance(estimator, Mapping) else estimator


def _has_field(estimator, name: str) -> bool:
    return dataclasses.is_dataclass(estimator) and any(f.name == name for f in dataclasses.fields(estimator))


def adapt(estimator, *, scaling: float, causal: bool):
    """The estimator as one attention layer uses it: the layer's logit scale, ``causal=True`` in causal layers,
    ``shared_noise=False`` (every head its own noise) where the estimator has that field."""
    changes = {}
    if _has_field(estimator, "shared_noise"):
        changes["shared_noise"] = False
    if _has_field(estimator, "scale"):
        changes["scale"] = scaling
    if causal:
        if not _has_field(estimator, "causal"):
            raise ValueError(f"the model's attention is causal but {type(estimator).__name__} has no causal field; "
                             "expected an estimator with a causal variant")
        changes["causal"] = True
    return dataclasses.replace(estimator, **changes) if changes else estimator


def _allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' from a boolean or additive float mask."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _check_mask(mask: torch.Tensor | None, n: int, m: int, causal: bool, layer: int) -> None:
    """Refuse a mask the estimators cannot honour: anything but no mask, or the causal mask in a causal layer."""
    if mask is None:
        return
    expected = torch.ones(n, m, dtype=torch.bool, device=mask.device)
    if causal:
        expected = expected.tril(m - n)
    if not bool((_allowed_keys(mask) == expected).all()):
        raise ValueError(
            f"attention layer {layer} got an attention mask that hides keys (padding or a custom pattern); evalab's "
            "estimators take no mask: run unpadded, one text (or one length bucket) per forward pass"
        )


def _is_causal(module, kwargs: dict) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if flag is None else flag)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function ``"evalab"``: query (B, H, N, d), key/value (B, H, M, d) ->
    (output (B, N, H, dv), None). Calls outside a run (or in layers not substituted) use the model's own function."""
    run = _ACTIVE.get()
    if run is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} runs only inside evalab.model_gap.substitute()")
    layer = run.calls
    run.calls += 1
    causal = _is_causal(module, kwargs)
    n, m, d = query.shape[-2], key.shape[-2], query.shape[-1]
    scaling = d**-0.5 if scaling is None else float(scaling)
    _check_mask(attention_mask, n, m, causal, layer)
    if run.record is not None:
        run.record.append((query.detach(), key.detach(), value.detach(), scaling, causal))
    chosen = run.estimator_for(layer)
    if chosen is None:
        return run.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise ValueError(f"attention dropout {dropout} is on (training mode); run the model in eval mode")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"layer {layer}: {query.shape[1]} query heads but {key.shape[1]} key heads; grouped-query "
                         "attention is not supported")
    est = run.variants.get((layer, scaling, causal))
    if est is None:
        est = run.variants[(layer, scaling, causal)] = adapt(chosen, scaling=scaling, causal=causal)
    if not _has_field(est, "scale"):
        query = query * (scaling * d**0.5)  # the estimator's default d**-0.5 then gives the layer's logits
    pieces = [est.draw(query[b : b + 1], key[b : b + 1], replicates=1,
                       generator=seeded_generator(run.seed, MODEL_PURPOSE, run.first_replicate + b, layer, run.text,
                                                  device=query.device))
              for b in range(query.shape[0])]
    noise = pieces[0].noise if len(pieces) == 1 else torch.cat([p.noise for p in pieces], dim=1)
    out = est(query, key, value, Draw(noise, pieces[0].kind))[0]  # (B, H, N, dv)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # a fresh interface instance reads the library-wide table that register() writes
    if AttentionInterface().get(IMPLEMENTATION) is not attention:
        AttentionInterface.register(IMPLEMENTATION, attention)
    if IMPLEMENTATION not in AttentionMaskInterface():
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # None when nothing is masked


def _own_attention(implementation: str) -> Callable:
    """The attention function of a model's own implementation (eager: the function in its modeling module)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return _eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


@contextlib.contextmanager
def substitute(model, estimator=None, *, layers: Sequence[int] | None = None, seed: int = 0, text: int = 0,
               first_replicate: int = 0, record: list | None = None) -> Iterator[None]:
    """Within the block, ``model``'s attention calls go through :func:`attention`: layers in ``layers`` (all when
    None) use ``estimator`` (None: none; a Mapping layer index -> estimator: each layer its own, layers it lacks
    exact), the others the model's own implementation; ``record`` (a list) receives (q, k, v, scaling, causal)
    of every call. The model's attention implementation is restored afterwards."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel whose attention goes through AttentionInterface, "
                        f"got {type(model).__name__}")
    _register()
    original = model.config._attn_implementation
    if original == IMPLEMENTATION:
        raise RuntimeError("substitute() blocks cannot be nested on one model")
    run = _Run(estimator, None if layers is None else frozenset(layers), seed, text, first_replicate,
               _own_attention(original), record)
    token = _ACTIVE.set(run)
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        _ACTIVE.reset(token)


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's eager attention (its own module's eager_attention_forward). The "evalab" mask builder leaves
    out a plain causal mask, which eager attention needs spelled out: it is added back here."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__}: its module has no eager_attention_forward; load the model with "
                         "attn_implementation='sdpa'")
    if attention_mask is None and _is_causal(module, kwargs):
        n, m = query.shape[-2], key.shape[-2]
        future = ~torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
        attention_mask = torch.zeros(n, m, dtype=query.dtype, device=query.device).masked_fill(
            future, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


# --- running the model ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _minilm():
    """all-MiniLM-L6-v2 and its tokenizer, loaded once per process (runs never change the weights)."""
    from ..inputs.minilm import load_model

    return load_model()


def _load(model, tokenizer):
    if isinstance(model, str):
        if model != "minilm":
            raise ValueError(f"model={model!r} is not a known model name; expected 'minilm' or a loaded transformers model")
        from ..inputs.minilm import MODEL_NAME

        tok, module = _minilm()
        return MODEL_NAME, module, tok if tokenizer is None else tokenizer
    if not hasattr(model, "set_attn_implementation") or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise TypeError(f"model must be 'minilm' or a transformers PreTrainedModel whose attention goes through "
                        f"AttentionInterface, got {type(model).__name__}")
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return name, model, tokenizer


@dataclass(frozen=True)
class Texts:
    """The token ids a run measures on and where they came from: ``seq_len`` and ``split`` are set for passages of
    the shipped text (evalab.inputs.passages), None for sentences or user texts."""

    ids: tuple
    seq_len: int | None = None
    split: str | None = None


def resolve_texts(texts, tokenizer, *, seq_len: int | None = None, split: str = "heldout") -> Texts:
    """The token ids of ``texts``: None / an int (that many shipped sentences, or with ``seq_len`` that many
    passages of ``seq_len`` tokens of ``split``; default 16 passages), a list of str, or of 1-D token-id tensors."""
    if isinstance(texts, Texts):
        return texts
    if seq_len is not None:
        from ..inputs.passages import passages

        _checks.choice("split", split, ["train", "heldout"])
        if tokenizer is None:
            raise ValueError("passages (seq_len given) need the model's tokenizer; pass tokenizer=")
        count = DEFAULT_PASSAGES if texts is None else texts
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"texts must be None or an int (the number of passages) when seq_len is given, got "
                            f"{type(texts).__name__}")
        ids = passages(seq_len, split, _checks.integer("texts", count, minimum=3), tokenizer=tokenizer)
        return Texts(tuple(ids), seq_len, split)
    if texts is None:
        texts = DEFAULT_TEXTS
    if isinstance(texts, int) and not isinstance(texts, bool):
        texts = default_texts(texts)
    if isinstance(texts, (str, torch.Tensor)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be an int (that many shipped sentences), a list of str or a list of 1-D token-id "
                        f"tensors, got {type(texts).__name__}")
    ids = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("texts are strings but there is no tokenizer; pass tokenizer= or token-id tensors")
            text = tokenizer(text, return_tensors="pt", truncation=True)["input_ids"][0]
        if not isinstance(text, torch.Tensor) or text.dim() != 1 or text.dtype != torch.long:
            raise TypeError(f"texts[{i}] must be a str or a 1-D torch.long tensor of token ids, got {text!r:.60}")
        ids.append(text)
    if len(ids) < 3:
        raise ValueError(f"texts has {len(ids)} texts; the similarity metrics need at least 3")
    return Texts(tuple(ids))


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L + 1, N, D) of one forward pass in the model's dtype, on the CPU: the embeddings, then
    every layer's output. The ids move to the model's device."""
    out = model(input_ids=ids.to(next(model.parameters()).device), output_hidden_states=True)
    return torch.stack(out.hidden_states, dim=1).cpu()


# --- the exact model, once per text -----------------------------------------------------------------------


@dataclass
class Exact:
    """The exact model on one text: hidden (L + 1, N, D) in the model's dtype on the CPU; calls: (N, M, d, dv,
    batch, scaling, causal) of every attention call in order; qkv: (q, k, v) of every call, or None when not kept."""

    hidden: torch.Tensor
    calls: tuple
    qkv: tuple | None

    @property
    def nbytes(self) -> int:
        tensors = [self.hidden, *(t for call in self.qkv or () for t in call)]
        return sum(t.numel() * t.element_size() for t in tensors)


_EXACT: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()


def clear_exact_cache() -> None:
    """Forget every cached exact-model run."""
    _EXACT.clear()


def _weights_version(module) -> int:
    """Changes whenever a parameter or buffer is modified in place (torch's per-tensor version counters),
    replaced or moved (its storage address)."""
    return hash(tuple((t.data_ptr(), t._version, t.dtype) for t in (*module.parameters(), *module.buffers())))


def exact_run(module, tokens: torch.Tensor, *, keep_qkv: bool = False) -> Exact:
    """The exact model on one text (1-D token ids): one forward pass through the model's own attention, cached
    (see the module docstring); ``keep_qkv`` also keeps every call's q, k, v."""
    per_model = _EXACT.setdefault(module, OrderedDict())
    key = (_weights_version(module), hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(), len(tokens))
    entry = per_model.get(key)
    if entry is not None and (entry.qkv is not None or not keep_qkv):
        per_model.move_to_end(key)
        return entry
    record: list = []
    with substitute(module, None, record=record):  # no estimator: every call is the model's own attention
        hidden = _hidden(module, tokens[None])[0]
    calls = tuple((q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], math.prod(q.shape[:-2]), scaling, causal)
                  for q, k, v, scaling, causal in record)
    qkv = tuple((q, k, v) for q, k, v, _, _ in record) if keep_qkv else None
    entry = per_model[key] = Exact(hidden, calls, qkv)
    total = sum(e.nbytes for e in per_model.values())
    while total > EXACT_CACHE_BYTES and len(per_model) > 1:
        total -= per_model.popitem(last=False)[1].nbytes
    return entry


def _layer_list(layers, count: int, estimator) -> frozenset | None:
    """The substituted layers: None for all (with a per-layer Mapping, all of its layers), else a set."""
    per_layer = isinstance(estimator, Mapping)
    if per_layer:
        for layer in estimator:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < count:
                raise ValueError(f"estimator has an entry for layer {layer!r}; the model has {count} attention layers "
                                 f"(0..{count - 1})")
    if isinstance(layers, str):
        _checks.choice("layers", layers, ["all"])
        return frozenset(estimator) if per_layer else None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    chosen = []
    for layer in layers:
        _checks.integer("layers", layer, minimum=0)
        if layer >= count:
            raise ValueError(f"layers contains {layer}; the model has {count} attention layers (0..{count - 1})")
        if per_layer and layer not in estimator:
            raise ValueError(f"layers contains {layer} but the per-layer estimator has no entry for it; expected "
                             f"layers among {sorted(estimator)}")
        chosen.append(layer)
    if not chosen:
        raise ValueError("layers is empty; expected 'all' or a list of layer indices")
    return frozenset(chosen)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity (T, T) of sentence embeddings (T, D)."""
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    return unit @ unit.T


def _neighbours(similarity: torch.Tensor) -> torch.Tensor:
    """Index of each sentence's most similar other sentence."""
    return similarity.clone().fill_diagonal_(-math.inf).argmax(-1)


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def describe(estimator) -> dict:
    """The row columns naming ``estimator``: estimator, its hyper-parameters, per_layer. For a per-layer Mapping:
    the registered name when every layer's is the same (else the names in layer order joined by "|") and the
    plain hyper-parameters (numbers, strings, None) that every layer shares."""
    if not isinstance(estimator, Mapping):
        return {**estimator_columns(estimator), "per_layer": False}
    ests = [estimator[layer] for layer in sorted(estimator)]
    names = [estimator_name(e) for e in ests]
    params = [estimator_parameters(e) for e in ests]
    shared = {key: value for key, value in params[0].items() if _plain(value)
              and all(key in p and _plain(p[key]) and p[key] == value for p in params[1:])}
    name = names[0] if len(set(names)) == 1 else "|".join(names)
    return {"estimator": name, **shared, "per_layer": True}


@dataclass(frozen=True, repr=False)  # the repr of Result
class ModelGap(Result):
    """End-to-end metrics of an estimator substituted for a model's attention, against the exact model.

    metrics: name -> Estimate (95% t interval over replicates): embedding_cosine (mean over texts of the cosine
    between mean-pooled last hidden states), embedding_cosine_worst (the lowest text's), last_hidden_rel_error
    (|H_hat - H|_F / |H|_F over every token of every text), neighbour_agreement (fraction of texts whose most
    similar other text is unchanged), similarity_spearman (Spearman correlation of the upper triangles of the
    pairwise cosine-similarity matrices), and call_rel_mse when per-call metrics were asked for.
    layer_errors: Estimate per layer of the hidden-state relative error after that layer.
    samples: name -> (R,) per-replicate values; flops: attention FLOPs of the substituted calls of one replicate;
    softmax_flops: exact softmax attention's FLOPs over the same calls; seq_len, split: the passages' length and
    split (None for sentences or user texts). estimator: one estimator, or a Mapping layer index -> estimator.
    """

    estimator: object
    model: str
    texts: int
    tokens: int
    layers: str
    replicates: int
    seed: int
    flops: float
    softmax_flops: float
    metrics: dict
    layer_errors: tuple
    samples: dict = field(repr=False)
    seq_len: int | None = None
    split: str | None = None

    @property
    def flops_fraction(self) -> float:
        """flops / softmax_flops: the fraction of exact attention's FLOPs the estimator spends."""
        return self.flops / self.softmax_flops

    def _base(self) -> dict:
        row = describe(self.estimator)
        row.update(model=self.model, texts=self.texts, tokens=self.tokens, seq_len=self.seq_len, split=self.split,
                   layers=self.layers, replicates=self.replicates, seed=self.seed)
        return row

    def columns(self) -> dict:
        return self._base()

    def extra_columns(self) -> dict:
        return {"flops": self.flops, "softmax_flops": self.softmax_flops, "flops_fraction": self.flops_fraction}

    def layer_frame(self) -> pd.DataFrame:
        """One row per layer: hidden_rel_error (with ``_low``/``_high``) of the hidden state after that layer."""
        rows = [{**self._base(), "layer": layer, "hidden_rel_error": e.value, "hidden_rel_error_low": e.low,
                 "hidden_rel_error_high": e.high} for layer, e in enumerate(self.layer_errors)]
        return pd.DataFrame(rows)

    def title(self) -> str:
        what = describe(self.estimator)["estimator"]
        length = "" if self.seq_len is None else f", seq_len={self.seq_len}, split={self.split!r}"
        return (f"ModelGap({what}, model={self.model!r}, texts={self.texts}{length}, layers={self.layers}, "
                f"replicates={self.replicates}, seed={self.seed}, flops_fraction={self.flops_fraction:.3g})")


def model_gap(
    estimator,
    model="minilm",
    texts=None,
    *,
    seq_len: int | None = None,
    split: str = "heldout",
    layers="all",
    replicates: int = 8,
    seed: int = 0,
    tokenizer=None,
    call_replicates: int = 0,
    replicate_block: int = 8,
    threads: int | None = None,
) -> ModelGap:
    """Run ``model`` exactly and with ``estimator`` in place of softmax attention in ``layers``; compare outputs.

    estimator: one estimator for every substituted layer, or a Mapping layer index -> estimator (e.g. a fitted
    bundle), each layer its own; layers the Mapping lacks run exactly. model: "minilm" (all-MiniLM-L6-v2,
    offline) or a loaded transformers model (its tokenizer as ``tokenizer`` when texts are strings or passages).
    texts: None (the first 100 sentences of the shipped text), an int (that many), or a list of str or of 1-D
    token-id tensors; each runs unpadded. seq_len: with it, texts counts passages of exactly seq_len tokens of
    ``split`` ("train" or "heldout"; evalab.inputs.passages), 16 when None. layers: "all", an int or a list of
    attention layer indices (call order). replicates >= 2 forward passes with independent noise
    (``replicate_block`` of them stacked per forward pass; the numbers do not depend on it). call_replicates > 0
    adds call_rel_mse: monte_carlo's rel_mse of the estimator on the exact model's own q, k, v of every
    substituted call, averaged over calls (interval over calls). threads: torch intra-op threads during the run
    (None: as set); short texts make many small ops, which run fastest on one thread when the CPU is busy.
    The exact model runs once per text and is cached across calls (module docstring).
    """
    _checks.integer("replicates", replicates, minimum=2)
    _checks.integer("seed", seed, minimum=0)
    _checks.integer("call_replicates", call_replicates, minimum=0)
    _checks.integer("replicate_block", replicate_block)
    if isinstance(estimator, Mapping) and not estimator:
        raise ValueError("estimator is an empty mapping; expected layer index -> estimator for at least one layer")
    name, module, tokenizer = _load(model, tokenizer)
    inputs = resolve_texts(texts, tokenizer, seq_len=seq_len, split=split)
    # replicates share a forward pass only where each batch element can get its own noise
    ests = list(estimator.values()) if isinstance(estimator, Mapping) else [estimator]
    batched = all(_has_field(e, "shared_noise") or getattr(e, "noise_kind", None) == "none" for e in ests)
    block = replicate_block if batched else 1
    training, previous = module.training, torch.get_num_threads()
    module.eval()
    if threads is not None:
        torch.set_num_threads(_checks.integer("threads", threads))
    try:
        with torch.no_grad():
            return _measure(estimator, name, module, inputs, layers, replicates, seed, block, call_replicates)
    finally:
        module.train(training)
        torch.set_num_threads(previous)


def _measure(estimator, name, module, inputs: Texts, layers, replicates, seed, block, call_replicates) -> ModelGap:
    ids = inputs.ids
    exact_emb, approx_emb, err_sq, ref_sq, runs = [], [], None, None, []
    chosen, count = None, None
    for t, tokens in enumerate(ids):
        run = exact_run(module, tokens, keep_qkv=call_replicates > 0)
        runs.append(run)
        exact = run.hidden.double()  # (L + 1, N, D): the model as it is
        if count is None:
            count = len(run.calls)
            chosen = _layer_list(layers, count, estimator)
            err_sq = torch.zeros(replicates, exact.shape[0] - 1, dtype=torch.float64)
            ref_sq = torch.zeros(exact.shape[0] - 1, dtype=torch.float64)
        hidden = []
        for start in range(0, replicates, block):
            b = min(block, replicates - start)
            with substitute(module, estimator, layers=chosen, seed=seed, text=t, first_replicate=start):
                hidden.append(_hidden(module, tokens[None].expand(b, -1)).double())
        hidden = torch.cat(hidden)  # (R, L + 1, N, D)
        err_sq += ((hidden - exact) ** 2)[:, 1:].sum((-2, -1))
        ref_sq += (exact**2)[1:].sum((-2, -1))
        exact_emb.append(exact[-1].mean(0))
        approx_emb.append(hidden[:, -1].mean(1))
    exact_emb, approx_emb = torch.stack(exact_emb), torch.stack(approx_emb, dim=1)  # (T, D), (R, T, D)
    layer_rel = (err_sq / ref_sq).sqrt()  # (R, L)
    cosine = _cosine(approx_emb, exact_emb)  # (R, T)
    sim = _similarity(exact_emb)
    upper = torch.triu_indices(len(ids), len(ids), 1)
    nearest = _neighbours(sim)
    agreement, spearman = [], []
    for r in range(replicates):
        sim_r = _similarity(approx_emb[r])
        agreement.append(float((_neighbours(sim_r) == nearest).double().mean()))
        pairs = sim[upper[0], upper[1]].numpy(), sim_r[upper[0], upper[1]].numpy()
        spearman.append(float(stats.spearmanr(*pairs).statistic))
    samples = {
        "embedding_cosine": cosine.mean(1).numpy(),
        "embedding_cosine_worst": cosine.min(1).values.numpy(),
        "last_hidden_rel_error": layer_rel[:, -1].numpy(),
        "neighbour_agreement": np.array(agreement),
        "similarity_spearman": np.array(spearman),
    }
    metrics = {key: mean_interval(value) for key, value in samples.items()}
    substituted = [layer for layer in range(count) if chosen is None or layer in chosen]
    if call_replicates:
        per_call = _call_rel_mse(estimator, runs, substituted, call_replicates, seed)
        samples["call_rel_mse"] = per_call
        metrics["call_rel_mse"] = mean_interval(per_call)
    flops = softmax_flops = 0.0
    for run in runs:
        for layer in substituted:
            flops += call_flops(layer_estimator(estimator, layer), *run.calls[layer])
            softmax_flops += call_flops(Softmax(), *run.calls[layer])
    return ModelGap(
        estimator=estimator, model=name, texts=len(ids), tokens=int(sum(len(i) for i in ids)),
        layers="all" if chosen is None else ",".join(map(str, sorted(chosen))), replicates=replicates, seed=seed,
        flops=float(flops), softmax_flops=float(softmax_flops), metrics=metrics,
        layer_errors=tuple(mean_interval(layer_rel[:, layer].numpy()) for layer in range(layer_rel.shape[1])),
        samples=samples, seq_len=inputs.seq_len, split=inputs.split,
    )


def call_flops(estimator, n: int, m: int, d: int, dv: int, batch: int, scaling: float, causal: bool) -> float:
    """FLOPs of ``estimator`` adapted to one attention call: n queries, m keys, head sizes d and dv, batch x heads."""
    est = adapt(estimator, scaling=scaling, causal=causal)
    return estimate_cost(est, N=n, M=m, d=d, dv=dv, batch=batch).flops()


def _call_rel_mse(estimator, runs, substituted, replicates: int, seed: int) -> np.ndarray:
    """monte_carlo's rel_mse of every substituted (text, layer) call, with that layer's adapted estimator."""
    values = []
    for run in runs:
        for layer in substituted:
            q, k, v = run.qkv[layer]
            _, _, _, _, _, scaling, causal = run.calls[layer]
            est = adapt(layer_estimator(estimator, layer), scaling=scaling, causal=causal)
            if not _has_field(est, "scale"):
                q = q * (scaling * q.shape[-1] ** 0.5)
            res = monte_carlo(est, q, k, v, replicates=replicates, seed=seed, matrix=False)
            values.append(res.rel_mse.value)
    return np.array(values)


def error_propagation(estimator, model="minilm", texts=None, *, seq_len: int | None = None, split: str = "heldout",
                      replicates: int = 8, seed: int = 0, tokenizer=None, replicate_block: int = 8,
                      threads: int | None = None) -> pd.DataFrame:
    """How a per-layer error grows through the layers: hidden_rel_error after layer l (with ``_low``/``_high``)
    when only layer l is approximated (``approximated="only"``) and when layers 0..l are (``"through"``; one
    all-layers run gives them all, since the hidden state after layer l depends on layers 0..l only and every
    layer's noise is seeded by its own index). ``"only"`` rows also carry the last hidden state's error, the
    error of layer l's approximation once it has passed through the rest of the model. texts, seq_len, split:
    as in :func:`model_gap` (the exact model runs once per text for all the runs); a per-layer Mapping gives
    rows for its layers."""
    name, module, tokenizer = _load(model, tokenizer)
    kwargs = dict(texts=resolve_texts(texts, tokenizer, seq_len=seq_len, split=split), replicates=replicates,
                  seed=seed, replicate_block=replicate_block, threads=threads)
    through = model_gap(estimator, module, layers="all", **kwargs)
    approximated = range(len(through.layer_errors))
    if isinstance(estimator, Mapping):
        approximated = sorted(estimator)
    rows = []
    for layer, e in enumerate(through.layer_errors):
        if layer in approximated:
            only = model_gap(estimator, module, layers=[layer], **kwargs)
            last = only.last_hidden_rel_error
            rows.append({"approximated": "only", "layer": layer, "hidden_rel_error": only.layer_errors[layer].value,
                         "hidden_rel_error_low": only.layer_errors[layer].low,
                         "hidden_rel_error_high": only.layer_errors[layer].high, "last_hidden_rel_error": last.value,
                         "last_hidden_rel_error_low": last.low, "last_hidden_rel_error_high": last.high})
        rows.append({"approximated": "through", "layer": layer, "hidden_rel_error": e.value,
                     "hidden_rel_error_low": e.low, "hidden_rel_error_high": e.high})
    base = {**describe(estimator), "model": name, "texts": through.texts, "seq_len": through.seq_len,
            "split": through.split, "replicates": replicates, "seed": seed}
    return pd.DataFrame([{**base, **row} for row in rows])


def gap_correlation(frame: pd.DataFrame, *, per_call: str = "call_rel_mse",
                    end_to_end: Sequence[str] = ("last_hidden_rel_error", "embedding_cosine", "neighbour_agreement",
                                                 "similarity_spearman")) -> pd.DataFrame:
    """Does the per-call gap predict the model gap? Spearman correlation across the rows of ``frame`` (one per
    estimator setting, from :meth:`ModelGap.to_frame`, e.g. a sweep of kind "model" on passages of one seq_len)
    between ``per_call`` and each end-to-end metric, with the number of rows and the two-sided p-value."""
    rows = []
    for metric in end_to_end:
        part = frame[[per_call, metric]].dropna()
        rho, p = stats.spearmanr(part[per_call], part[metric]) if len(part) > 2 else (math.nan, math.nan)
        rows.append({"per_call": per_call, "end_to_end": metric, "spearman": float(rho), "p_value": float(p),
                     "cells": len(part)})
    return pd.DataFrame(rows)


# --- sweeps -----------------------------------------------------------------------------------------------


def sweep_row(estimator, cell) -> dict:
    """The row of a sweep cell of inputs kind "model": model_gap's to_frame() row, on the CPU, one intra-op
    thread (a sentence's forward pass is many small ops; on a busy 2-core CPU, 2 threads ran them 10-50x slower).
    Cells of one sweep process share the exact model's runs (the exact-run cache)."""
    from ..inputs.model import model_inputs

    settings = model_inputs(**cell.inputs)
    res = model_gap(estimator, settings["model"], settings["texts"], seq_len=settings["seq_len"],
                    split=settings["split"], layers=settings["layers"], replicates=cell.replicates, seed=cell.mc_seed,
                    call_replicates=settings["call_replicates"], threads=1)
    return res.to_frame().iloc[0].to_dict()
