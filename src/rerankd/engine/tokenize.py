"""Pair encoding for cross-encoders: the query once, each document truncated on its side only.

The query is tokenized once per request and reused for every document; documents are
tokenized in one batch call (Rust, parallel, GIL released; without character offsets, which
nothing here reads; BERT tokenizers through `fast_tokenize`'s cheaper equivalent).
Only the document side is cut to fit `max_length`; a query too long to leave room is cut
to half of it.

Pairs are assembled with numpy from the post-processor's layout (special tokens before the
query, between query and document, after the document), learned once per tokenizer and kept
only if it reproduces `Tokenizer.post_process` exactly; any other post-processor goes through
`post_process` pair by pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from rerankd.engine.fast_tokenize import BertFastPath
from rerankd.errors import ModelLoadError

# A query may take at most this share of max_length; the rest is the document's.
_MAX_QUERY_SHARE = 0.5


@dataclass
class EncodedPair:
    """One (query, document) pair ready for the model."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    # True for tokens token pruning must keep: special tokens and the query.
    protected: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(folder: Path) -> Tokenizer:
    """The fast tokenizer of a checkpoint: tokenizer.json, else a WordPiece from vocab.txt."""
    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = True
        cfg = folder / "tokenizer_config.json"
        if cfg.exists():
            lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
    else:
        raise ModelLoadError(f"no tokenizer.json or vocab.txt in {folder}")
    tok.no_truncation()
    tok.no_padding()
    return tok


@dataclass
class EncodedRequest:
    """The pairs of one request, and for each pair the document it belongs to.

    A long document contributes several pairs (its windows); `owners[k]` is the index of
    the document that pair k was cut from, so scores can be folded back per document.
    """

    pairs: list[EncodedPair]
    owners: list[int]
    num_documents: int
    depth: int | None = None

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.pairs)


class PairEncoder:
    """Encodes (query, documents) into model inputs under a token budget per pair."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int, zero_token_types: bool) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.zero_token_types = zero_token_types
        self.special_tokens = tokenizer.num_special_tokens_to_add(is_pair=True)
        if model_max_length <= self.special_tokens + 2:
            raise ModelLoadError(f"model max length {model_max_length} leaves no room for text")
        # Same ids as encode_batch, minus the character offsets; BERT tokenizers faster.
        self._encode_batch = BertFastPath(tokenizer).encode_batch
        # The post-processor's layout, learned once; None = post_process every pair.
        self.template = _learn_template(tokenizer)

    def encode(
        self,
        query: str,
        documents: list[str],
        max_length: int,
        *,
        windows: bool = False,
        overlap: int = 0,
        max_doc_tokens: int = 0,
    ) -> EncodedRequest:
        """Pairs for every document: one (truncated), or with `windows` one per window.

        Windows hold `doc_room` document tokens each and share `overlap` tokens with the
        previous one; `max_doc_tokens` (0 = no cap) bounds the tokens read per document.
        """
        max_length = min(max_length, self.model_max_length)
        (q,) = self._encode_batch([query], add_special_tokens=False)
        query_room = int(max_length * _MAX_QUERY_SHARE)
        if len(q.ids) > query_room:
            q.truncate(query_room)
        doc_room = max_length - self.special_tokens - len(q.ids)
        overlap = min(max(overlap, 0), doc_room // 2)
        docs = self._encode_batch(documents, add_special_tokens=False)
        pairs: list[EncodedPair] = []
        owners: list[int] = []
        if self.template is not None and doc_room > 0 and max_doc_tokens >= 0:
            build = _PairBuilder(self.template, q.ids, doc_room, self.zero_token_types)
            for i, d in enumerate(docs):
                ids = np.asarray(d.ids, dtype=np.int64)
                for start, stop in _spans(len(ids), doc_room, windows, overlap, max_doc_tokens):
                    pairs.append(build.pair(ids[start:stop]))
                    owners.append(i)
        else:
            for i, d in enumerate(docs):
                for part in self._parts(d, doc_room, windows, overlap, max_doc_tokens):
                    pairs.append(_post_processed(self.tokenizer, q, part, self.zero_token_types))
                    owners.append(i)
        return EncodedRequest(pairs, owners, len(documents))

    @staticmethod
    def _parts(d: Encoding, doc_room: int, windows: bool, overlap: int, cap: int) -> list[Encoding]:
        if cap and len(d.ids) > cap:
            d.truncate(cap)  # the tail past the cap is dropped, not windowed
        if len(d.ids) <= doc_room:
            return [d]
        d.truncate(doc_room, stride=overlap if windows else 0)
        return [d, *d.overflowing] if windows else [d]


def _spans(n: int, room: int, windows: bool, overlap: int, cap: int) -> list[tuple[int, int]]:
    """[start, stop) of each part of an `n`-token document, cut as `PairEncoder._parts` cuts.

    Mirrors `Encoding.truncate(room, stride=overlap)`: parts of `room` tokens starting every
    `room - overlap` tokens, up to the first part that reaches the end. Needs room > overlap.
    """
    if cap and n > cap:
        n = cap  # the tail past the cap is dropped, not windowed
    if n <= room:
        return [(0, n)]
    if not windows:
        return [(0, room)]
    step = room - overlap
    spans = []
    start = 0
    while True:
        stop = min(start + room, n)
        spans.append((start, stop))
        if stop == n:
            return spans
        start += step


def _post_processed(
    tokenizer: Tokenizer, q: Encoding, d: Encoding, zero_types: bool
) -> EncodedPair:
    """The generic pair: whatever the tokenizer's post-processor makes of (q, d)."""
    enc = tokenizer.post_process(q, d, add_special_tokens=True)
    ids = np.asarray(enc.ids, dtype=np.int64)
    protected = np.asarray([s != 1 for s in enc.sequence_ids], dtype=bool)
    types = np.zeros_like(ids) if zero_types else np.asarray(enc.type_ids, dtype=np.int64)
    return EncodedPair(ids, types, protected)


@dataclass(frozen=True)
class _PairTemplate:
    """A pair post-processor's layout: `pre A mid B post`, each special run with its types."""

    pre: np.ndarray
    pre_types: np.ndarray
    a_type: int
    mid: np.ndarray
    mid_types: np.ndarray
    b_type: int
    post: np.ndarray
    post_types: np.ndarray


class _PairBuilder:
    """Pairs of one query with document slices of at most `room` tokens, by concatenation."""

    def __init__(self, t: _PairTemplate, q_ids: list[int], room: int, zero_types: bool) -> None:
        q = np.asarray(q_ids, dtype=np.int64)
        self.head = np.concatenate((t.pre, q, t.mid))
        self.post = t.post
        self.zero_types = zero_types
        a_types = np.full(len(q), t.a_type, dtype=np.int64)
        self.head_types = np.concatenate((t.pre_types, a_types, t.mid_types))
        self.doc_types = np.full(room, t.b_type, dtype=np.int64)
        self.post_types = t.post_types
        # protected: special tokens and the query, not the document
        self.head_kept = np.ones(len(self.head), dtype=bool)
        self.doc_kept = np.zeros(room, dtype=bool)
        self.post_kept = np.ones(len(self.post), dtype=bool)

    def pair(self, doc: np.ndarray) -> EncodedPair:
        n = len(doc)
        ids = np.concatenate((self.head, doc, self.post))
        if self.zero_types:
            types = np.zeros(len(ids), dtype=np.int64)
        else:
            types = np.concatenate((self.head_types, self.doc_types[:n], self.post_types))
        protected = np.concatenate((self.head_kept, self.doc_kept[:n], self.post_kept))
        return EncodedPair(ids, types, protected)


# Probe pairs for learning a template: plain words any vocabulary tokenizes (unknown tokens
# count too), cut to these (query, document) lengths, empty sides included.
_PROBE_QUERY = "what is the boiling point of water"
_PROBE_DOC = "water boils at one hundred degrees at sea level"
_PROBE_SHAPES = ((2, 3), (1, 1), (3, 0), (0, 2), (0, 0), (4, 5))


def _learn_template(tokenizer: Tokenizer) -> _PairTemplate | None:
    """The layout of `tokenizer`'s pair post-processor if it is `pre A mid B post`, else None.

    Read off one probe pair (special tokens are those in `special_tokens_mask`), then kept only
    if `_PairBuilder` reproduces `post_process` exactly (ids, token types, protected mask) on
    every probe pair.
    """
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        return None  # post_process would truncate or pad the pair too
    try:
        return _read_template(tokenizer)
    except Exception:  # a post-processor that balks at a probe: keep the generic path
        return None


def _read_template(tokenizer: Tokenizer) -> _PairTemplate | None:
    probes = []
    for qn, dn in _PROBE_SHAPES:
        q = tokenizer.encode(_PROBE_QUERY, add_special_tokens=False)
        d = tokenizer.encode(_PROBE_DOC, add_special_tokens=False)
        if len(q.ids) < qn or len(d.ids) < dn:
            return None
        q.truncate(qn)
        d.truncate(dn)
        probes.append((q, d))
    q, d = probes[0]
    enc = tokenizer.post_process(q, d, add_special_tokens=True)
    text = [i for i, special in enumerate(enc.special_tokens_mask) if not special]
    qn, dn = len(q.ids), len(d.ids)
    if len(text) != qn + dn:
        return None
    a0, a1, b0, b1 = text[0], text[qn - 1] + 1, text[qn], text[-1] + 1
    if a1 - a0 != qn or b1 - b0 != dn:
        return None  # a side is not one contiguous run
    ids = np.asarray(enc.ids, dtype=np.int64)
    types = np.asarray(enc.type_ids, dtype=np.int64)
    if len(set(types[a0:a1].tolist())) != 1 or len(set(types[b0:b1].tolist())) != 1:
        return None
    t = _PairTemplate(
        ids[:a0], types[:a0], int(types[a0]),
        ids[a1:b0], types[a1:b0], int(types[b0]),
        ids[b1:], types[b1:],
    )  # fmt: skip
    if len(t.pre) + len(t.mid) + len(t.post) != tokenizer.num_special_tokens_to_add(True):
        return None
    room = max(dn for _, dn in _PROBE_SHAPES)
    for q, d in probes:
        want = _post_processed(tokenizer, q, d, zero_types=False)
        got = _PairBuilder(t, q.ids, room, zero_types=False).pair(np.asarray(d.ids, np.int64))
        if not all(
            np.array_equal(a, b)
            for a, b in (
                (got.input_ids, want.input_ids),
                (got.token_type_ids, want.token_type_ids),
                (got.protected, want.protected),
            )
        ):
            return None
    return t


def collate(
    pairs: list[EncodedPair], pad_id: int, with_protected: bool = False
) -> dict[str, np.ndarray]:
    """Right-pad a batch to its longest pair (`protected` too when token pruning needs it)."""
    width = max(len(p) for p in pairs)
    ids = np.full((len(pairs), width), pad_id, dtype=np.int64)
    types = np.zeros((len(pairs), width), dtype=np.int64)
    mask = np.zeros((len(pairs), width), dtype=np.int64)
    for i, p in enumerate(pairs):
        n = len(p)
        ids[i, :n] = p.input_ids
        types[i, :n] = p.token_type_ids
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if with_protected:
        protected = np.zeros((len(pairs), width), dtype=bool)
        for i, p in enumerate(pairs):
            protected[i, : len(p)] = p.protected if p.protected is not None else True
        batch["protected"] = protected
    return batch
