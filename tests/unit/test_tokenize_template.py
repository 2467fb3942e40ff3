"""The numpy pair assembly (learned post-processor template) equals `post_process`, pair by pair.

The reference is the encoder as it was: `encode_batch` and `Tokenizer.post_process` on every
pair. Production uses `encode_batch_fast` and, when the post-processor's layout is learned,
concatenates precomputed pieces instead; both must give identical input_ids, token_type_ids
and protected masks, windows and caps included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from rerankd.engine.bundled import backbone_dir, resolve_source
from rerankd.engine.tokenize import EncodedRequest, PairEncoder, load_tokenizer

WORDS = (
    "the", "a", "of", "water", "boiling", "point", "altitude", "sea", "level", "degrees",
    "celsius", "heat", "pressure", "river", "mountain", "city", "north", "south", "cat", "dog",
    "sat", "on", "mat", "run", "fast", "slow", "blue", "green", "red", "house", "tree",
)  # fmt: skip


def corpus() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(200)]


def tiny_wordpiece(pair_template: str) -> Tokenizer:
    """A lower-casing WordPiece over WORDS with XLM-R-like special tokens and `pair_template`."""
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS, "##s"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair=pair_template, special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok


def tiny_bpe(post: processors.PostProcessor | None) -> Tokenizer:
    """A byte-level BPE trained in the test on a tiny corpus, with post-processor `post`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = post
    return tok


def bundled(name: str) -> Callable[[], Tokenizer]:
    return lambda: load_tokenizer(resolve_source(f"bundled:{name}"))


def backbone(name: str) -> Callable[[], Tokenizer]:
    return lambda: load_tokenizer(backbone_dir(name))


TOKENIZERS = [
    pytest.param(bundled("splade-tiny"), id="bundled-splade-tiny", marks=pytest.mark.slow),
    pytest.param(bundled("all-minilm-l6-v2"), id="bundled-minilm", marks=pytest.mark.slow),
    pytest.param(backbone("all-minilm-l6-v2"), id="minilm-tokenizer"),
    pytest.param(lambda: tiny_wordpiece("<s> $A </s> </s> $B </s>"), id="xlmr-template"),
    pytest.param(lambda: tiny_wordpiece("<s>:1 $A:0 </s>:0 $B:1 </s>:2"), id="typed-template"),
    pytest.param(
        lambda: tiny_bpe(processors.RobertaProcessing(("</s>", 2), ("<s>", 0))), id="roberta-bpe"
    ),
    pytest.param(lambda: tiny_bpe(None), id="no-post-processor"),
]


def reference(enc: PairEncoder) -> PairEncoder:
    """The same encoder the old way: encode_batch, and post_process on every pair."""
    ref = copy.copy(enc)
    ref.template = None
    ref._encode_batch = enc.tokenizer.encode_batch
    return ref


def generic(enc: PairEncoder) -> PairEncoder:
    """post_process on every pair, on encode_batch_fast output (the fallback path)."""
    gen = copy.copy(enc)
    gen.template = None
    return gen


def assert_same(got: EncodedRequest, want: EncodedRequest) -> None:
    assert got.owners == want.owners
    assert got.num_documents == want.num_documents
    assert len(got.pairs) == len(want.pairs)
    for g, w in zip(got.pairs, want.pairs, strict=True):
        assert g.input_ids.dtype == w.input_ids.dtype == np.int64
        assert g.token_type_ids.dtype == w.token_type_ids.dtype == np.int64
        assert g.protected is not None and w.protected is not None
        assert g.protected.dtype == w.protected.dtype == np.bool_
        assert g.input_ids.tolist() == w.input_ids.tolist()
        assert g.token_type_ids.tolist() == w.token_type_ids.tolist()
        assert g.protected.tolist() == w.protected.tolist()


LONG = " ".join(corpus()[:30])  # ~360 words: several windows at small max_length
DOCS = [
    "the cat sat on the mat",
    LONG,
    " ",  # empty-ish: no tokens at all
    "",
    "Water BOILING points zebras",  # casing, and words outside the tiny vocabularies
    "\t \n",
    " ".join(corpus()[:6]),
    "a",
]
QUERY = "boiling point of water at altitude"
LONG_QUERY = " ".join(corpus()[:8])  # longer than half of every max_length below

# (query, max_length, keyword options)
CASES = [
    pytest.param(QUERY, 64, {}, id="truncate"),
    pytest.param(QUERY, 48, {"windows": True, "overlap": 8}, id="windows"),
    pytest.param(QUERY, 40, {"windows": True, "overlap": 0}, id="windows-no-overlap"),
    pytest.param(QUERY, 40, {"windows": True, "overlap": 1000}, id="windows-overlap-capped"),
    pytest.param(QUERY, 48, {"windows": True, "overlap": 8, "max_doc_tokens": 100}, id="cap"),
    pytest.param(QUERY, 48, {"windows": False, "max_doc_tokens": 20}, id="cap-truncate"),
    pytest.param(QUERY, 48, {"windows": True, "max_doc_tokens": 41}, id="cap-inside-room"),
    pytest.param(LONG_QUERY, 32, {"windows": True, "overlap": 4}, id="long-query"),
    pytest.param(LONG_QUERY, 64, {}, id="long-query-truncate"),
    pytest.param("", 64, {"windows": True, "overlap": 4}, id="empty-query"),
    pytest.param(QUERY, 10_000, {"windows": True, "overlap": 32}, id="over-model-limit"),
]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.param()


@pytest.mark.parametrize("zero_token_types", [False, True])
@pytest.mark.parametrize(("query", "max_length", "options"), CASES)
def test_fast_path_matches_post_process(
    tokenizer: Tokenizer, query: str, max_length: int, options: dict, zero_token_types: bool
) -> None:
    enc = PairEncoder(tokenizer, 128, zero_token_types)
    assert enc.template is not None  # every tokenizer here has a pre-A-mid-B-post layout
    want = reference(enc).encode(query, DOCS, max_length, **options)
    assert_same(enc.encode(query, DOCS, max_length, **options), want)
    assert_same(generic(enc).encode(query, DOCS, max_length, **options), want)
    if zero_token_types:
        assert all(not p.token_type_ids.any() for p in want.pairs)


def test_no_documents(tokenizer: Tokenizer) -> None:
    req = PairEncoder(tokenizer, 128, False).encode(QUERY, [], 64, windows=True)
    assert req.pairs == [] and req.owners == [] and req.num_documents == 0


def test_empty_document_is_query_and_specials_only() -> None:
    """A document of only whitespace has no tokens: [CLS] q [SEP] [SEP], as before."""
    enc = PairEncoder(load_tokenizer(backbone_dir("all-minilm-l6-v2")), 512, False)
    q = enc.tokenizer.encode(QUERY, add_special_tokens=False).ids
    (p,) = enc.encode(QUERY, [" "], 64).pairs
    cls, sep = enc.tokenizer.token_to_id("[CLS]"), enc.tokenizer.token_to_id("[SEP]")
    assert p.input_ids.tolist() == [cls, *q, sep, sep]
    assert p.token_type_ids.tolist() == [0] * (len(q) + 2) + [1]
    assert p.protected is not None and p.protected.all()


def test_learned_layouts() -> None:
    bert = PairEncoder(load_tokenizer(backbone_dir("all-minilm-l6-v2")), 512, False).template
    assert bert is not None
    assert (bert.pre.tolist(), bert.mid.tolist(), bert.post.tolist()) == ([101], [102], [102])
    assert (bert.a_type, bert.b_type, bert.post_types.tolist()) == (0, 1, [1])
    xlmr = PairEncoder(tiny_wordpiece("<s> $A </s> </s> $B </s>"), 128, False).template
    assert xlmr is not None
    assert (xlmr.pre.tolist(), xlmr.mid.tolist(), xlmr.post.tolist()) == ([0], [2, 2], [2])
    assert (xlmr.a_type, xlmr.b_type) == (0, 0)


@pytest.mark.parametrize(
    "make",
    [
        # the document before the query: not the pre-A-mid-B-post layout
        pytest.param(lambda: tiny_wordpiece("<s> $B </s> $A </s>"), id="swapped"),
        # post_process would truncate (or pad) the pair itself
        pytest.param(
            lambda: _with(tiny_wordpiece("<s> $A </s> </s> $B </s>"), truncate=64),
            id="truncation-on",
        ),
        pytest.param(
            lambda: _with(tiny_wordpiece("<s> $A </s> </s> $B </s>"), pad=True), id="padding-on"
        ),
    ],
)
def test_unfit_post_processors_fall_back_to_post_process(make: Callable[[], Tokenizer]) -> None:
    enc = PairEncoder(make(), 128, False)
    assert enc.template is None
    opts = {"windows": True, "overlap": 4}
    assert_same(enc.encode(QUERY, DOCS, 40, **opts), reference(enc).encode(QUERY, DOCS, 40, **opts))


def _with(tok: Tokenizer, truncate: int = 0, pad: bool = False) -> Tokenizer:
    if truncate:
        tok.enable_truncation(truncate)
    if pad:
        tok.enable_padding(pad_id=1, pad_token="<pad>")
    return tok


def test_fast_batch_gives_the_same_ids_on_dl19(
    dl19: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    tok = load_tokenizer(backbone_dir("all-minilm-l6-v2"))
    for query, cands in dl19[:3]:
        texts = [query, *(text for _, text in cands)]
        slow = tok.encode_batch(texts, add_special_tokens=False)
        fast = tok.encode_batch_fast(texts, add_special_tokens=False)
        assert [e.ids for e in fast] == [e.ids for e in slow]
        enc = PairEncoder(tok, 512, False)
        opts = {"windows": True, "overlap": 32, "max_doc_tokens": 4096}
        texts = [text for _, text in cands]
        for ml in (256, 64):
            want = reference(enc).encode(query, texts, ml, **opts)
            assert_same(enc.encode(query, texts, ml, **opts), want)
