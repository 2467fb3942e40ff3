"""The ASCII fast route gives exactly the ids of the tokenizer it stands in for.

Reference: the real tokenizer's `encode_batch` on the same texts. Checked on generated
texts built from the characters that matter (every ASCII punctuation mark, control
characters, added tokens in any case, words past WordPiece's length limit, non-ASCII
letters) and on the real corpora in ../shared/data where present.
"""

from __future__ import annotations

import functools
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from rerankd.engine.ascii_tokenize import AsciiFastPath
from rerankd.engine.bundled import backbone_dir
from rerankd.engine.tokenize import load_tokenizer
from tests.helpers import dataset_dir, read_jsonl

BUNDLED = ("splade-tiny", "all-minilm-l6-v2")


def bundled_tokenizer(name: str, truncate: int | None = None) -> Tokenizer:
    tok = load_tokenizer(backbone_dir(name))
    if truncate:
        tok.enable_truncation(truncate)
    return tok


@functools.cache
def bundled_pair(name: str, truncate: int | None = None) -> tuple[Tokenizer, AsciiFastPath]:
    """A bundled tokenizer and its fast route, built once per test session."""
    tok = bundled_tokenizer(name, truncate)
    return tok, AsciiFastPath(tok)


def reference_ids(tok: Tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=special)]


_PIECES = st.one_of(
    st.sampled_from(["word", "Word", "WORD", "h2o", "1,013.25", "e-mail", "don't", "x" * 101]),
    st.sampled_from(list(string.punctuation)),
    st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", "\x07", "\x7f"]),
    st.sampled_from(["[SEP]", "[sep]", "[Mask]", "[PAD]", "[UNK]x", "[cls"]),
    st.sampled_from(["café", "naïve", "日本", "\u00a0", "\u2019", "\ufffd", "Ω"]),
    st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12),
)
TEXTS = st.lists(_PIECES, max_size=30).map("".join)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tokenizers_take_the_fast_route(name: str) -> None:
    fast = AsciiFastPath(bundled_tokenizer(name))
    assert fast.active
    assert fast.fast_eligible("What is the boiling point of water?")
    for text in ("naïve", "a [SEP] b", "a [sep] b", "tab\x0bvertical", "nul\x00"):
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
    texts = ["plain text", "café au lait", "a [SEP] b", "More, plain; text!", "\x00x"]
    fast = AsciiFastPath(tok)
    assert [fast.fast_eligible(t) for t in texts] == [True, False, False, True, False]
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert got == reference_ids(tok, texts, False)


def test_other_normalizers_keep_the_original_route() -> None:
    """A tokenizer whose normalizer is not BertNormalizer is never sent the fast way."""
    tok = bundled_tokenizer("splade-tiny")
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    fast = AsciiFastPath(tok)
    assert not fast.active
    assert not fast.fast_eligible("plain text")
    texts = ["Plain, TEXT here.", "ﬁne ligature"]
    assert [e.ids for e in fast.encode_batch(texts)] == reference_ids(tok, texts, True)


def test_a_copy_that_disagrees_on_the_probes_is_not_used() -> None:
    """The probe check is what guards the rewrite: a cased vocabulary read as uncased fails."""
    tok = bundled_tokenizer("splade-tiny")
    spec = tok.to_str().replace('"lowercase":true', '"lowercase":false')
    cased = Tokenizer.from_str(spec)
    fast = AsciiFastPath(cased)
    # A cased BertNormalizer is supported: its copy keeps the case and still agrees.
    assert fast.active and not fast.lowercase
    texts = ["Mixed Case, Words!", "UPPER lower"]
    assert [e.ids for e in fast.encode_batch(texts)] == reference_ids(cased, texts, True)


@pytest.mark.parametrize("dataset", ["trec-dl-2019", "scifact", "cranfield", "cisi"])
def test_same_ids_on_real_corpora(dataset: str) -> None:
    rows = read_jsonl(dataset_dir(dataset) / "corpus.jsonl")[:3000]
    texts = [f"{r.get('title', '')} {r['text']}".strip() for r in rows]
    tok = bundled_tokenizer("all-minilm-l6-v2")
    fast = AsciiFastPath(tok)
    assert sum(map(fast.fast_eligible, texts)) > len(texts) // 2  # the route is used
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert got == reference_ids(tok, texts, False)
