"""Attention transfer (docs/theory.md section 17): fit a learned estimator's parameters to a
model's captured q, k, v so that its attention mimics softmax.

    res = ev.fit(ev.Hedgehog(), train, heldout=heldout, loss="attention", steps=200, lr=1e-2, seed=0)
    est, curve = res            # the fitted estimator and the training curve (step, split, loss, texts)

Inputs are one workload (a QKV or (q, k, v): q (*b, N, d)) or a list of them (one per text; lengths may
differ). Batch axes are heads (H,) or layers and heads (L, H): every head gets its own parameters (leading
axes of the batch shape on every learnable tensor), and since the loss is a mean over heads and Adam acts
elementwise, fitting all heads at once is fitting each head alone. With a layer axis (``layers=True``, by
default when the inputs' ``info`` counts ``layers``) the fitted estimator is a :class:`FittedLayers`, a
``Mapping[int, estimator]`` from layer index to that layer's estimator.

Losses, per text averaged over heads and queries (and over the texts of a step):
- ``"attention"``: the attention cross-entropy sum_m -A_nm log Ahat_nm of the exact softmax row A against the
  estimator's row Ahat (its output for one-hot values, :func:`evalab.attention_matrix`; Hedgehog's loss);
- ``"output"``: the output error |Yhat_n - Y_n|^2 (LoLCATs' first stage).

Deterministic: Adam over the learnable tensors, minibatches of texts drawn from a generator seeded by ``seed``;
the same seed, inputs and machine give bit-equal parameters on CPU. Held-out inputs are never used for a
gradient; fit refuses held-out inputs that share a fingerprint (:func:`evalab.estimators.fitted.fingerprints`)
with the training inputs, and records both sets of fingerprints in ``FitResult.training``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from .. import _checks
from ..estimators.draw import seeded_generator
from ..estimators.fitted import FittedLayers, fingerprints, learnable_fields, parameters, with_parameters
from ..estimators.softmax import softmax_attention
from ..inputs.qkv import QKV
from .monte_carlo import attention_matrix

LOSSES = ("attention", "output")
FIT_PURPOSE = 0x666974  # "fit": keeps the minibatch stream apart from other seeded streams
#: Floor on the estimator's attention weights inside the log of the cross-entropy (a weight of exactly 0,
#: which relu maps can give, would make the loss infinite).
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns; unpacks as ``estimator, curve = result``.

    estimator: the fitted estimator (a :class:`FittedLayers` for a per-layer fit). curve: one row per training
    step (split "train": the loss of that step's minibatch before its update, and at step = steps the loss of
    every training text with the final parameters) and per evaluation (split "heldout", at step 0, every
    ``eval_every`` steps and at the end); columns step, split, loss, texts. training: loss, steps, lr, seed,
    batch and the fingerprints of the training ("train") and held-out ("heldout") inputs.
    """

    estimator: object
    curve: pd.DataFrame
    training: dict

    def __iter__(self) -> Iterator:
        return iter((self.estimator, self.curve))

    def split(self, inputs) -> str:
        """"train" if ``inputs`` (a QKV or (q, k, v)) were among the training inputs, else "heldout"."""
        return "train" if fingerprints(inputs) & set(self.training["train"]) else "heldout"

    def loss(self, split: str = "heldout") -> float:
        """The final loss on ``split`` ("train" or "heldout"); NaN when no held-out inputs were given."""
        rows = self.curve[self.curve["split"] == _checks.choice("split", split, ("train", "heldout"))]
        rows = rows[rows["step"] == self.training["steps"]]
        return float(rows["loss"].iloc[-1]) if len(rows) else math.nan


def _workloads(name: str, inputs) -> list[QKV]:
    """A list of QKV from a QKV, a (q, k, v) tuple or a list of either; MiniLM captures of passages (q of shape
    (L, P, H, N, d), ``info["passage_sha256"]``) become one workload per passage."""
    if isinstance(inputs, QKV):
        digests = inputs.info.get("passage_sha256")
        if digests and inputs.q.dim() == 5 and inputs.q.shape[1] == len(digests):
            info = {key: inputs.info[key] for key in ("model", "seq_len", "split", "layers", "heads") if key in inputs.info}
            return [QKV(*(t[:, i] for t in inputs), inputs.scale, {**info, "text_sha256": digest})
                    for i, digest in enumerate(digests)]
        return [inputs]
    if isinstance(inputs, tuple) and len(inputs) == 3 and all(isinstance(t, torch.Tensor) for t in inputs):
        return [QKV(*inputs, scale=inputs[0].shape[-1] ** -0.5)]
    if isinstance(inputs, (list, tuple)):
        out = [w for item in inputs for w in _workloads(name, item)]
        if not out:
            raise ValueError(f"{name} must hold at least one workload, got an empty {type(inputs).__name__}")
        return out
    raise TypeError(f"{name} must be a QKV, a (q, k, v) tuple or a list of them, got {type(inputs).__name__}")


def _per_head(estimator, batch: tuple[int, ...], dtype, device):
    """(the estimator with one set of parameters per batch element, its learnable tensors as fresh leaf tensors
    of ``dtype`` on ``device``). An estimator with a ``heads`` field (its parameters' leading axes) has its
    tensors copied along the batch axes that ``heads`` lacks; otherwise a tensor whose leading axes are not
    already ``batch`` is copied along all of them."""
    own = getattr(estimator, "heads", None)
    if own is not None and tuple(batch[len(batch) - len(own):]) != tuple(own):
        raise ValueError(f"estimator has heads={tuple(own)}, which does not broadcast as the trailing axes of the "
                         f"inputs' batch shape {batch}")
    out = {}
    for name, t in parameters(estimator).items():
        if isinstance(t, (int, float)) and not isinstance(t, bool):  # a number (e.g. a mixing weight): one per head
            t = torch.tensor(float(t))
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"learnable field {name} of {type(estimator).__name__} must be a tensor or a number, "
                            f"got {type(t).__name__}")
        t = t.detach().to(device=device, dtype=dtype)
        missing = batch[:len(batch) - len(own)] if own is not None else (() if t.shape[:len(batch)] == batch else batch)
        out[name] = t.expand(tuple(missing) + tuple(t.shape)).clone().requires_grad_(True)
    return with_parameters(estimator, out, batch), out


def transfer_loss(estimator, w: QKV, kind: str) -> torch.Tensor:
    """The mean over heads and queries of loss ``kind`` ("attention" or "output", see the module docstring) of
    ``estimator`` on one workload ``w`` (a QKV or (q, k, v)): a 0-dim tensor, differentiable in its parameters."""
    _checks.choice("loss", kind, LOSSES)
    q, k, v = w
    causal = getattr(estimator, "causal", False)
    draw = estimator.draw(q, k, replicates=1, generator=0)
    if kind == "output":
        y = softmax_attention(q, k, v, scale=getattr(estimator, "scale", None), causal=causal)
        return ((estimator(q, k, v, draw)[0] - y) ** 2).sum(-1).mean()
    eye = torch.eye(k.shape[-2], dtype=k.dtype, device=k.device).expand(*k.shape[:-2], -1, -1)
    exact = softmax_attention(q, k, eye, scale=getattr(estimator, "scale", None), causal=causal)
    approx = attention_matrix(estimator, q, k, draw)[0]
    return -(exact * approx.clamp_min(LOG_FLOOR).log()).sum(-1).mean()


class Adam:
    """Adam (Kingma and Ba 2015) over a list of leaf tensors, in place, with torch.optim.Adam's defaults
    (betas 0.9, 0.999; eps 1e-8; bias-corrected moments): a few elementwise operations per tensor, in a fixed
    order, so the same gradients give the same bits. Tensors without a gradient are left alone, as torch's."""

    def __init__(self, tensors: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.tensors, self.lr, self.betas, self.eps, self.steps = tensors, lr, betas, eps, 0
        self.first = [torch.zeros_like(t) for t in tensors]
        self.second = [torch.zeros_like(t) for t in tensors]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        for t, m, v in zip(self.tensors, self.first, self.second):
            g = t.grad
            if g is None:  # a tensor the loss does not depend on (a window's mixing weight without a window)
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** self.steps)).sqrt_().add_(self.eps)
            t.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.steps))
            t.grad = None


def _mean_loss(estimator, group: list[QKV], kind: str) -> torch.Tensor:
    """The loss averaged over the workloads of ``group``; workloads of one shape run as one batched call
    (stacked on a new leading axis, which the per-head parameters broadcast against)."""
    shapes: dict = {}
    for w in group:
        shapes.setdefault((w.q.shape, w.k.shape, w.v.shape), []).append(w)
    total = 0.0
    for same in shapes.values():
        stacked = same[0] if len(same) == 1 else QKV(*(torch.stack(ts) for ts in zip(*same)), same[0].scale)
        total = total + transfer_loss(estimator, stacked, kind) * len(same)
    return total / len(group)


def fit(
    estimator,
    inputs,
    *,
    loss: str = "attention",
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    batch: int | None = None,
    heldout=None,
    eval_every: int | None = None,
    layers: bool | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit ``estimator``'s learnable tensors to softmax attention on ``inputs`` by Adam; see the module docstring.

    estimator: a learned estimator (a frozen dataclass with ``learnable_fields``); its ``scale`` (when None)
    becomes the inputs' scale. inputs: the training workloads; heldout: workloads for evaluation only (never a
    gradient). batch: texts per step (default all), drawn without replacement per step from a generator of
    ``seed``. eval_every: steps between held-out evaluations (default steps // 10). layers: the first batch axis
    is a layer axis (default: when the inputs' info counts layers and the batch has two axes).
    """
    _checks.choice("loss", loss, LOSSES)
    _checks.integer("steps", steps, minimum=0)
    _checks.real("lr", lr, strict=True)
    _checks.integer("seed", seed, minimum=0)
    fields = learnable_fields(estimator)
    train = _workloads("inputs", inputs)
    held = [] if heldout is None else _workloads("heldout", heldout)
    batch = len(train) if batch is None else _checks.integer("batch", batch)
    if batch > len(train):
        raise ValueError(f"batch={batch} is more than the {len(train)} training workloads")
    eval_every = max(1, steps // 10) if eval_every is None else _checks.integer("eval_every", eval_every)
    shape = train[0].q.shape[:-2]
    for name, group in (("inputs", train), ("heldout", held)):
        for i, w in enumerate(group):
            _checks.qkv(*w, causal=getattr(estimator, "causal", False))
            if w.q.shape[:-2] != shape:
                raise ValueError(f"{name}[{i}] has batch shape {tuple(w.q.shape[:-2])}, expected {tuple(shape)} "
                                 "(every workload needs the same heads)")
    seen = frozenset().union(*(fingerprints(w) for w in train))
    unseen = frozenset().union(*(fingerprints(w) for w in held)) if held else frozenset()
    if seen & unseen:
        raise ValueError(f"heldout shares {len(seen & unseen)} input(s) with inputs (fingerprints "
                         f"{sorted(seen & unseen)[:2]}); held-out inputs must not be fitted on")
    if layers is None:
        layers = bool(train[0].info.get("layers")) and len(shape) == 2
    _checks.boolean("layers", layers)
    if layers and len(shape) < 1:
        raise ValueError("layers=True needs inputs with a leading layer axis, q of shape (L, *heads, N, d)")
    if dataclasses.is_dataclass(estimator) and any(f.name == "scale" for f in dataclasses.fields(estimator)) \
            and estimator.scale is None:
        estimator = dataclasses.replace(estimator, scale=train[0].scale)
    dtype = _checks.compute_dtype(*train[0])
    train = [w.to(dtype=dtype) for w in train]
    held = [w.to(dtype=dtype) for w in held]

    estimator, tensors = _per_head(estimator, tuple(shape), dtype, train[0].q.device)
    optimiser = Adam(list(tensors.values()), lr=lr)
    generator = seeded_generator(seed, FIT_PURPOSE)
    rows = []

    def current():
        return dataclasses.replace(estimator, **tensors)

    def evaluate(split, group, step):
        with torch.no_grad():
            value = float(_mean_loss(current(), group, loss))
        rows.append({"step": step, "split": split, "loss": value, "texts": len(group)})

    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc=f"fit {type(estimator).__name__}", unit="step")
    for step in steps_iter:
        if held and step % eval_every == 0:
            evaluate("heldout", held, step)
        chosen = torch.randperm(len(train), generator=generator)[:batch].tolist() if batch < len(train) else range(len(train))
        total = _mean_loss(current(), [train[i] for i in chosen], loss)
        total.backward()
        optimiser.step()
        rows.append({"step": step, "split": "train", "loss": float(total.detach()), "texts": batch})
        if progress:
            steps_iter.set_postfix_str(f"loss {rows[-1]['loss']:.4g}")
    evaluate("train", train, steps)
    if held:
        evaluate("heldout", held, steps)
    fitted = dataclasses.replace(estimator, **{n: t.detach() for n, t in tensors.items()})
    if layers:
        fitted = FittedLayers(fitted, range(shape[0]))
    training = {"loss": loss, "steps": steps, "lr": lr, "seed": seed, "batch": batch, "fields": list(fields),
                "train": sorted(seen), "heldout": sorted(unseen)}
    return FitResult(fitted, pd.DataFrame(rows, columns=["step", "split", "loss", "texts"]), training)
