"""Pair encoding for cross-encoders: the query once, each document truncated on its side only.

The query is tokenized once per request and reused for every document; documents are
tokenized in one batch call (Rust, parallel, GIL released). Only the document side is
cut to fit `max_length`; a query too long to leave room is cut to half of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

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
        q = self.tokenizer.encode(query, add_special_tokens=False)
        query_room = int(max_length * _MAX_QUERY_SHARE)
        if len(q.ids) > query_room:
            q.truncate(query_room)
        doc_room = max_length - self.special_tokens - len(q.ids)
        overlap = min(max(overlap, 0), doc_room // 2)
        docs = self.tokenizer.encode_batch(documents, add_special_tokens=False)
        pairs: list[EncodedPair] = []
        owners: list[int] = []
        for i, d in enumerate(docs):
            for part in self._parts(d, doc_room, windows, overlap, max_doc_tokens):
                pairs.append(self._pair(q, part))
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

    def _pair(self, q: Encoding, d: Encoding) -> EncodedPair:
        enc = self.tokenizer.post_process(q, d, add_special_tokens=True)
        ids = np.asarray(enc.ids, dtype=np.int64)
        protected = np.asarray([s != 1 for s in enc.sequence_ids], dtype=bool)
        types = (
            np.zeros_like(ids)
            if self.zero_token_types
            else np.asarray(enc.type_ids, dtype=np.int64)
        )
        return EncodedPair(ids, types, protected)


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
