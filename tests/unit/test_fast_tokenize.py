"""The fast route gives exactly the ids of the BERT tokenizer it stands in for.

Reference: the real tokenizer's `encode_batch` on the same texts. Checked on generated
texts built from the characters that matter (every ASCII punctuation mark, control
characters, added tokens in any case, words past WordPiece's length limit, accents,
combining marks, Greek final sigma, CJK, Unicode spaces and punctuation, format
characters) and on the real corpora in ../shared/data where present.
"""

from __future__ import annotations

import functools
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from rerankd.engine.bundled import backbone_dir
from rerankd.engine.fast_tokenize import MAX_TABLE, BertFastPath
from rerankd.engine.tokenize import load_tokenizer
from tests.helpers import dataset_dir, read_jsonl

BUNDLED = ("splade-tiny", "all-minilm-l6-v2")


def bundled_tokenizer(name: str, truncate: int | None = None) -> Tokenizer:
    tok = load_tokenizer(backbone_dir(name))
    if truncate:
        tok.enable_truncation(truncate)
    return tok


@functools.cache
def bundled_pair(name: str, truncate: int | None = None) -> tuple[Tokenizer, BertFastPath]:
    """A bundled tokenizer and its fast route, built once per test session."""
    tok = bundled_tokenizer(name, truncate)
    return tok, BertFastPath(tok)


def reference_ids(tok: Tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=special)]


_PIECES = st.one_of(
    st.sampled_from(["word", "Word", "WORD", "h2o", "1,013.25", "e-mail", "don't", "x" * 101]),
    st.sampled_from(list(string.punctuation)),
    st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", "\x07", "\x7f"]),
    st.sampled_from(["[SEP]", "[sep]", "[Mask]", "[PAD]", "[UNK]x", "[cls"]),
    st.sampled_from(["café", "NAÏVE", "Straße", "ΟΔΟΣ", "ς", "İstanbul", "ﬁ", "Ⅻ", "½"]),
    st.sampled_from(
        ["日本", "中文字", "ｆｕｌｌ", "한국어", "\u0301", "e\u0301", "\u0344", "\u037e"]
    ),
    st.sampled_from(["\u00a0", "\u2003", "\u2028", "\u0085", "\u200b", "\u200d", "\ufeff"]),
    st.sampled_from(["\u2019", "\u201c", "\u2014", "\u00bf", "\u00a7", "€", "\ufffd", "😀"]),
    st.sampled_from(["â\x80\x99", "Ã©", "\x85", "\x9f"]),
    st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12),
    st.text(min_size=1, max_size=4),
)
TEXTS = st.lists(_PIECES, max_size=30).map("".join)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tokenizers_take_the_fast_route(name: str) -> None:
    fast = BertFastPath(bundled_tokenizer(name))
    assert fast.active
    for text in ("What is the boiling point of water?", "naïve café", "tab\x0bvertical"):
        assert fast.fast_eligible(text), text
    for text in ("a [SEP] b", "a [sep] b", "e\u0301", "\u0301"):
        assert not fast.fast_eligible(text), text


@pytest.mark.parametrize("name", BUNDLED)
@settings(max_examples=200, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=8), special=st.booleans())
def test_same_ids_as_the_tokenizer(name: str, texts: list[str], special: bool) -> None:
    tok, fast = bundled_pair(name)
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=special)]
    assert got == reference_ids(tok, texts, special)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=8))
def test_same_ids_under_truncation(texts: list[str]) -> None:
    """The copy keeps the tokenizer's truncation (the query encoders set one)."""
    tok, fast = bundled_pair("splade-tiny", 12)
    got = [e.ids for e in fast.encode_batch(texts)]
    assert got == reference_ids(tok, texts, True)
    assert all(len(ids) <= 12 for ids in got)


def test_mixed_batches_keep_their_order() -> None:
    tok = bundled_tokenizer("splade-tiny")
    texts = ["plain text", "café au lait", "a [SEP] b", "More, plain; text!", "e\u0301x"]
    fast = BertFastPath(tok)
    assert [fast.fast_eligible(t) for t in texts] == [True, True, False, True, False]
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert got == reference_ids(tok, texts, False)


def test_other_normalizers_keep_the_original_route() -> None:
    """A tokenizer whose normalizer is not BertNormalizer is never sent the fast way."""
    tok = bundled_tokenizer("splade-tiny")
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    fast = BertFastPath(tok)
    assert not fast.active
    assert not fast.fast_eligible("plain text")
    texts = ["Plain, TEXT here.", "ﬁne ligature"]
    assert [e.ids for e in fast.encode_batch(texts)] == reference_ids(tok, texts, True)


def test_a_copy_that_disagrees_on_the_probes_is_not_used() -> None:
    """The probe check is what guards the rewrite: a cased vocabulary read as uncased fails."""
    tok = bundled_tokenizer("splade-tiny")
    spec = tok.to_str().replace('"lowercase":true', '"lowercase":false')
    cased = Tokenizer.from_str(spec)
    fast = BertFastPath(cased)
    # A cased BertNormalizer is supported: its copy keeps the case and still agrees.
    assert fast.active and not fast.lowercase
    texts = ["Mixed Case, Words!", "UPPER lower"]
    assert [e.ids for e in fast.encode_batch(texts)] == reference_ids(cased, texts, True)


@pytest.mark.parametrize("dataset", ["trec-dl-2019", "scifact", "cranfield", "cisi"])
def test_same_ids_on_real_corpora(dataset: str) -> None:
    rows = read_jsonl(dataset_dir(dataset) / "corpus.jsonl")[:3000]
    texts = [f"{r.get('title', '')} {r['text']}".strip() for r in rows]
    tok = bundled_tokenizer("all-minilm-l6-v2")
    fast = BertFastPath(tok)
    assert sum(map(fast.fast_eligible, texts)) > len(texts) * 0.9  # the route is used
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert got == reference_ids(tok, texts, False)


def test_a_full_table_sends_new_characters_the_original_way(monkeypatch) -> None:
    """Past MAX_TABLE learned characters, text with an unseen one takes the slow route."""
    tok = bundled_tokenizer("splade-tiny")
    fast = BertFastPath(tok)
    monkeypatch.setattr("rerankd.engine.fast_tokenize.MAX_TABLE", len(fast._table))
    assert fast.fast_eligible("café")  # é was learned from the probes
    assert not fast.fast_eligible("Ω")
    texts = ["Ω café", "plain"]
    assert [e.ids for e in fast.encode_batch(texts)] == reference_ids(tok, texts, True)
    assert MAX_TABLE > 1000
