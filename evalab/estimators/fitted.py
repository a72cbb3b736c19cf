"""Fitted estimators on disk: save and load a learned estimator's parameters with a content hash, and name the
file in a sweep spec (docs/theory.md section 17).

A learned estimator is a frozen dataclass whose class attribute ``learnable_fields`` names its tensor fields;
its other fields are hyper-parameters. A file holds those tensors (safetensors: no pickle, nothing but
tensors and strings is read), and as metadata the class's import path, the hyper-parameters, the layer
indices of a per-layer fit, what the fit saw (``training``: loss, steps, seed, the fingerprints of its
training and held-out inputs) and ``sha256``, the content hash of the class, hyper-parameters, layers and
tensors. Loading recomputes the hash and refuses a file whose content does not match it (or an expected hash).

    path = "hedgehog.safetensors"
    ev.save_fitted(result, path)                   # a FitResult, an estimator, or a per-layer bundle
    est = ev.load_fitted(path)                     # a Fitted: an estimator that delegates to the loaded one
    est.sha256, est.training["train"]              # the hash; fingerprints of the inputs it was fitted on

In a sweep spec: ``name = "fitted:hedgehog.safetensors"``, or ``name = "fitted"`` with ``file = ...`` and
``sha256 = ...`` (checked). Result rows carry ``file``, ``sha256`` and ``split``: "train" when the cell's
inputs are among those the estimator was fitted on (by fingerprint), "heldout" otherwise.

Loading imports the module the file names (as a spec's import path does) and builds only a dataclass that
declares ``learnable_fields``; load files whose module names you trust.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .._files import atomic_write
from .draw import Draw

FORMAT = "evalab-fitted-1"


def learnable_fields(estimator) -> tuple[str, ...]:
    """The tensor fields of a learned estimator (its class attribute ``learnable_fields``); TypeError otherwise."""
    fields = getattr(type(estimator), "learnable_fields", None)
    if not dataclasses.is_dataclass(estimator) or not isinstance(fields, tuple) or not fields:
        raise TypeError(f"estimator must be a learned estimator (a dataclass with a non-empty learnable_fields "
                        f"tuple), got {type(estimator).__name__}")
    return fields


def hyper_parameters(estimator) -> dict:
    """The fields of a learned estimator that are not learnable, as a JSON-able dict."""
    learned = set(learnable_fields(estimator))
    return {f.name: getattr(estimator, f.name) for f in dataclasses.fields(estimator) if f.name not in learned}


def parameters(estimator) -> dict[str, torch.Tensor]:
    """The learnable tensors of a learned estimator, by field name."""
    return {name: getattr(estimator, name) for name in learnable_fields(estimator)}


def with_parameters(estimator, tensors: dict, heads: tuple[int, ...] | None = None):
    """``dataclasses.replace(estimator, **tensors)``; an estimator with a ``heads`` field (its parameters'
    leading axes) gets ``heads`` too when given."""
    changes = dict(tensors)
    if heads is not None and any(f.name == "heads" for f in dataclasses.fields(estimator)):
        changes["heads"] = tuple(heads)
    return dataclasses.replace(estimator, **changes)


def _import_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def content_hash(estimator, layers: tuple[int, ...] | None = None) -> str:
    """sha256 (hex) of the class's import path, the hyper-parameters, the layer indices and every learnable
    tensor (name, dtype, shape and bytes, in field order)."""
    h = hashlib.sha256()
    head = {"class": _import_path(type(estimator)), "hyper": hyper_parameters(estimator),
            "layers": None if layers is None else list(layers)}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name, t in parameters(estimator).items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FittedLayers(Mapping):
    """A per-layer fit: ``layers[i]`` is layer i's estimator (its parameters with the layer axis taken out).

    ``stacked`` holds every layer's parameters along a leading layer axis, (L, *head axes, ...), so it runs on
    a model's q/k/v of shape (L, H, N, d) in one call; ``indices`` are the layer indices in that order.
    """

    def __init__(self, stacked, indices) -> None:
        learnable_fields(stacked)
        self.stacked, self.indices = stacked, tuple(int(i) for i in indices)
        sizes = {t.shape[0] if t.dim() else None for t in parameters(stacked).values()}
        if sizes != {len(self.indices)}:
            raise ValueError(f"every learnable tensor must have a leading layer axis of size {len(self.indices)}, "
                             f"got leading sizes {sorted(map(str, sizes))}")

    def __getitem__(self, layer: int):
        if layer not in self.indices:
            raise KeyError(f"layer {layer!r} was not fitted; fitted layers: {list(self.indices)}")
        i = self.indices.index(layer)
        heads = getattr(self.stacked, "heads", None)
        return with_parameters(self.stacked, {n: t[i] for n, t in parameters(self.stacked).items()},
                               None if heads is None else tuple(heads)[1:])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"FittedLayers({type(self.stacked).__name__}, layers={list(self.indices)})"


def save_fitted(fitted, path, *, training: dict | None = None) -> str:
    """Write a fitted estimator to ``path`` (safetensors); returns its content hash.

    ``fitted``: a learned estimator, a :class:`FittedLayers`, or a FitResult (then ``training`` defaults to what
    the fit recorded: loss, steps, lr, seed, fingerprints of its training and held-out inputs).
    """
    from safetensors.torch import save

    if hasattr(fitted, "estimator") and hasattr(fitted, "training"):  # a FitResult
        training = fitted.training if training is None else training
        fitted = fitted.estimator
    layers = None
    if isinstance(fitted, FittedLayers):
        fitted, layers = fitted.stacked, fitted.indices
    digest = content_hash(fitted, layers)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in parameters(fitted).items()}
    metadata = {
        "format": FORMAT,
        "class": _import_path(type(fitted)),
        "hyper": json.dumps(hyper_parameters(fitted), sort_keys=True),
        "layers": json.dumps(None if layers is None else list(layers)),
        "training": json.dumps(training or {}, sort_keys=True, default=str),
        "sha256": digest,
    }
    data = save(tensors, metadata=metadata)
    atomic_write(Path(path), lambda handle: handle.write(data))
    return digest


def _read(path: Path, sha256: str | None):
    """(estimator or FittedLayers, content hash, training record) from a file written by save_fitted."""
    from safetensors import safe_open

    from .registry import estimator_class

    if not path.is_file():
        raise FileNotFoundError(f"fitted estimator file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # not a safetensors file
        raise ValueError(f"file={str(path)!r} is not a fitted-estimator file ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"file={str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    cls = estimator_class(meta["class"])
    fields = getattr(cls, "learnable_fields", None)
    if not dataclasses.is_dataclass(cls) or not isinstance(fields, tuple) or set(fields) != set(tensors):
        raise ValueError(f"file={str(path)!r} names class {meta['class']!r}, which is not a learned estimator "
                         f"with learnable fields {sorted(tensors)}")
    estimator = cls(**json.loads(meta["hyper"]), **tensors)
    layers = json.loads(meta["layers"])
    digest = content_hash(estimator, None if layers is None else tuple(layers))
    if digest != meta.get("sha256"):
        raise ValueError(f"file={str(path)!r}: content hash {digest} does not match the recorded sha256 "
                         f"{meta.get('sha256')}; the file was altered")
    if sha256 is not None and digest != sha256:
        raise ValueError(f"file={str(path)!r} has sha256 {digest}, expected sha256={sha256!r}")
    loaded = estimator if layers is None else FittedLayers(estimator, layers)
    return loaded, digest, json.loads(meta["training"])


@dataclass(frozen=True)
class Fitted:
    """A fitted estimator loaded from ``file`` (written by :func:`save_fitted`), checked against ``sha256``
    when given; ``sha256`` then holds the file's content hash. Delegates the estimator protocol to the loaded
    estimator (for a per-layer file: the stacked one, whose parameters broadcast against (L, H) batch axes).

    ``estimator``: what was loaded (an estimator or a FittedLayers); ``training``: what the fit recorded;
    ``split(inputs)``: "train" when ``inputs`` are among the fit's training inputs (by fingerprint), else
    "heldout".
    """

    file: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.file, str) or not self.file:
            raise TypeError(f"file must be a path string, got {self.file!r}")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or len(self.sha256) != 64):
            raise ValueError(f"sha256={self.sha256!r} must be a 64-character hex digest or None")
        loaded, digest, training = _read(Path(self.file).expanduser(), self.sha256)
        object.__setattr__(self, "sha256", digest)
        object.__setattr__(self, "estimator", loaded)
        object.__setattr__(self, "training", training)

    @property
    def _inner(self):
        return self.estimator.stacked if isinstance(self.estimator, FittedLayers) else self.estimator

    @property
    def noise_kind(self) -> str:
        return self._inner.noise_kind

    @property
    def scale(self):
        return getattr(self._inner, "scale", None)

    @property
    def causal(self) -> bool:
        return getattr(self._inner, "causal", False)

    def noise_layout(self, q, k):
        return self._inner.noise_layout(q, k)

    def draw(self, q, k, *, replicates: int = 1, generator=None) -> Draw:
        return self._inner.draw(q, k, replicates=replicates, generator=generator)

    def __call__(self, q, k, v, draw: Draw) -> torch.Tensor:
        return self._inner(q, k, v, draw)

    def cost(self, **sizes):
        from ..measure.cost import estimate_cost

        return estimate_cost(self._inner, **sizes)

    def split(self, inputs) -> str:
        """"train" if ``inputs`` (a QKV or (q, k, v)) were among the fit's training inputs, else "heldout"."""
        return "train" if fingerprints(inputs) & set(self.training.get("train", ())) else "heldout"


def fingerprints(inputs) -> frozenset[str]:
    """What identifies an input workload: ``text:<sha256>`` for each text its ``info`` names
    (``passage_sha256``, a list, for MiniLM captures of passages; else ``text_sha256``, a string or a list), else ``qkv:<sha256>`` of the q, k, v tensors' bytes in float32 (so a float64 workload
    and its float32 copy are one workload)."""
    info = getattr(inputs, "info", None) or {}
    texts = info.get("passage_sha256") or info.get("text_sha256")
    if texts:
        return frozenset(f"text:{t}" for t in ([texts] if isinstance(texts, str) else texts))
    h = hashlib.sha256()
    for t in tuple(inputs)[:3]:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return frozenset({f"qkv:{h.hexdigest()}"})


def load_fitted(path, *, sha256: str | None = None) -> Fitted:
    """The fitted estimator in ``path`` (see :func:`save_fitted`), its hash checked (and against ``sha256``)."""
    return Fitted(str(path), sha256)
