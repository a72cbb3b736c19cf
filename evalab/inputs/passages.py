"""Token-id passages of a chosen length from the shipped public-domain text, with a fixed train / held-out split.

    ids = ev.inputs.passages(512, split="heldout", count=16)   # 16 tensors of 512 all-MiniLM-L6-v2 token ids

The split is by book (evalab/inputs/data/README.md): ``"train"`` passages come from Genesis (49,292 word
pieces), ``"heldout"`` passages from Exodus (40,880), so no sentence is in both splits. Within a book, the text
(chapter headings left out) is cut into sentences at ``.``, ``?`` and ``!``; passage 0 starts at the first
sentence, and each passage is ``[CLS]`` + the next ``seq_len - 2`` word pieces (running across sentences, the
last one cut) + ``[SEP]``: exactly ``seq_len`` tokens, no padding. The next passage starts at the first sentence
that begins after the previous passage's last word piece, so passages never overlap and each begins at a
sentence start. The passages are a deterministic function of (seq_len, split, tokenizer).
"""
from __future__ import annotations

import functools
import re
from importlib import resources

import torch

from .. import _checks

SPLITS = {"train": "genesis_kjv.txt", "heldout": "exodus_kjv.txt"}
BOOKS = {"train": "Genesis", "heldout": "Exodus"}


def book_text(split: str) -> str:
    """The shipped book of ``split`` as the data file holds it ("Genesis N" / "Exodus N" heading lines included)."""
    _checks.choice("split", split, list(SPLITS))
    return resources.files("evalab.inputs").joinpath("data", SPLITS[split]).read_text(encoding="utf-8")


def sentences(split: str) -> list[str]:
    """The sentences of ``split``'s book in order: chapter headings left out, verses joined, cut after . ? !"""
    text = book_text(split)
    heading = re.compile(rf"{BOOKS[split]} \d+")
    body = " ".join(line for line in text.splitlines() if line.strip() and not heading.fullmatch(line))
    return re.split(r"(?<=[.?!])\s+", body.strip())


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from .minilm import load_tokenizer

    return load_tokenizer()


@functools.lru_cache(maxsize=8)
def _pieces(split: str, tokenizer) -> tuple[tuple[int, ...], ...]:
    """Word pieces of every sentence of ``split`` (no special tokens)."""
    encoded = tokenizer(sentences(split), add_special_tokens=False, verbose=False)["input_ids"]
    return tuple(tuple(ids) for ids in encoded)


def _special(tokenizer) -> tuple[int, int]:
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] tokens; passages need a "
                         "BERT-style tokenizer (cls_token_id and sep_token_id)")
    return cls, sep


def passage_count(seq_len: int, split: str = "heldout", *, tokenizer=None) -> int:
    """How many passages of ``seq_len`` tokens ``split`` holds."""
    return len(_spans(seq_len, split, tokenizer))


def _spans(seq_len: int, split: str, tokenizer) -> list[tuple[int, int]]:
    """(first sentence, number of sentences touched) of every passage."""
    _checks.integer("seq_len", seq_len, minimum=3)
    _checks.choice("split", split, list(SPLITS))
    pieces = _pieces(split, _minilm_tokenizer() if tokenizer is None else tokenizer)
    spans, start, body = [], 0, seq_len - 2
    while start < len(pieces):
        taken, stop = 0, start
        while stop < len(pieces) and taken < body:
            taken += len(pieces[stop])
            stop += 1
        if taken < body:
            break  # the book's end: too few word pieces left
        spans.append((start, stop - start))
        start = stop  # the first sentence that begins after this passage's last word piece
    return spans


def passages(seq_len: int = 512, split: str = "heldout", count: int | None = None, *, tokenizer=None) -> list[torch.Tensor]:
    """The first ``count`` passages (None: all) of ``split`` ("train": Genesis, "heldout": Exodus), each a 1-D
    torch.long tensor of exactly ``seq_len`` token ids, ``[CLS]`` ... ``[SEP]``. tokenizer: a BERT-style
    tokenizer (default all-MiniLM-L6-v2's); seq_len >= 3 (MiniLM runs at most 512)."""
    tok = _minilm_tokenizer() if tokenizer is None else tokenizer
    spans = _spans(seq_len, split, tok)
    if count is not None:
        _checks.integer("count", count, minimum=1)
        if count > len(spans):
            raise ValueError(f"count={count} is more than the {len(spans)} passages of {seq_len} tokens in the "
                             f"{split!r} split; expected count <= {len(spans)}")
        spans = spans[:count]
    cls, sep = _special(tok)
    pieces = _pieces(split, tok)
    out = []
    for start, length in spans:
        body = [p for sentence in pieces[start : start + length] for p in sentence][: seq_len - 2]
        out.append(torch.tensor([cls, *body, sep], dtype=torch.long))
    return out
