"""Pair encoding: document-side truncation, long queries, token types."""

from __future__ import annotations

import itertools

from rerankd.engine.bundled import backbone_dir
from rerankd.engine.tokenize import PairEncoder, collate, load_tokenizer


def encoder() -> PairEncoder:
    return PairEncoder(
        load_tokenizer(backbone_dir("all-minilm-l6-v2")), 512, zero_token_types=False
    )


def test_pair_layout_and_token_types() -> None:
    enc = encoder()
    tok = enc.tokenizer
    (p,) = enc.encode("hello world", ["a cat sat"], 64).pairs
    ids = p.input_ids.tolist()
    assert ids[0] == tok.token_to_id("[CLS]")
    assert ids.count(tok.token_to_id("[SEP]")) == 2
    first_sep = ids.index(tok.token_to_id("[SEP]"))
    assert p.token_type_ids[: first_sep + 1].tolist() == [0] * (first_sep + 1)
    assert set(p.token_type_ids[first_sep + 1 :].tolist()) == {1}


def test_only_the_document_is_truncated() -> None:
    enc = encoder()
    query = "what is the boiling point of water at altitude"
    q_ids = enc.tokenizer.encode(query, add_special_tokens=False).ids
    (p,) = enc.encode(query, ["word " * 1000], 32).pairs
    assert len(p) == 32
    assert p.input_ids[1 : 1 + len(q_ids)].tolist() == q_ids  # query intact
    assert p.input_ids[-1] == enc.tokenizer.token_to_id("[SEP]")


def test_overlong_query_is_cut_to_half_and_document_keeps_room() -> None:
    enc = encoder()
    (p,) = enc.encode("query " * 500, ["doc " * 500], 64).pairs
    assert len(p) == 64
    seps = [i for i, t in enumerate(p.input_ids) if t == enc.tokenizer.token_to_id("[SEP]")]
    assert seps[0] == 1 + 32  # [CLS] + 32 query tokens
    assert seps[1] - seps[0] - 1 > 0  # the document still has tokens


def test_max_length_capped_by_model_limit() -> None:
    enc = PairEncoder(load_tokenizer(backbone_dir("all-minilm-l6-v2")), 48, False)
    (p,) = enc.encode("q", ["doc " * 500], 10_000).pairs
    assert len(p) == 48


def test_collate_pads_right_with_mask() -> None:
    enc = encoder()
    pairs = enc.encode("q", ["a", "a b c d e f"], 64).pairs
    batch = collate(pairs, pad_id=0)
    assert batch["input_ids"].shape == (2, len(pairs[1]))
    assert batch["attention_mask"][0].sum() == len(pairs[0])
    assert (batch["input_ids"][0, len(pairs[0]) :] == 0).all()


def test_long_documents_become_overlapping_windows() -> None:
    enc = encoder()
    doc = " ".join(["alpha", "beta", "gamma", "delta"] * 50)  # single-token words
    req = enc.encode("q", [doc, "short"], 32, windows=True, overlap=6)
    windows = [p for p, o in zip(req.pairs, req.owners, strict=True) if o == 0]
    assert req.owners[-1] == 1 and len(windows) > 1
    room = 32 - 3 - 1  # specials and the one query token
    bodies = [w.input_ids[3:-1].tolist() for w in windows]
    assert all(len(b) == room for b in bodies[:-1])
    for prev, nxt in itertools.pairwise(bodies):
        assert prev[-6:] == nxt[:6]  # consecutive windows share `overlap` tokens
    full = enc.tokenizer.encode(doc, add_special_tokens=False).ids
    assert bodies[-1][-1] == full[-1]  # the whole document is read


def test_max_doc_tokens_caps_the_windows() -> None:
    enc = encoder()
    doc = "alpha " * 1000
    capped = enc.encode("q", [doc], 32, windows=True, overlap=0, max_doc_tokens=100)
    assert sum(len(p) - 4 for p in capped.pairs) == 100
    truncated = enc.encode("q", [doc], 32, windows=False)
    assert len(truncated.pairs) == 1
