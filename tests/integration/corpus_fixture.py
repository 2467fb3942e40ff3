"""A small, real retrieval corpus for the connector tests, and the brute-force references.

The connector tests need data on which "the first stage returned the right ids" is a claim
that can be false: a slice of SciFact (queries with their relevant abstracts plus a few
hundred others), real all-MiniLM-L6-v2 embeddings for the dense side, and references computed
here in numpy, independently of any database (cosine top-k, sparse dot-product top-k, RRF).

The sparse vectors are the *test's own*: term frequencies over a hashed vocabulary
(`hashed_tf_sparse`), not SPLADE. They exist so Qdrant's sparse path is exercised with
vectors whose exact dot products the test can recompute; the real `SparseEncoder` can be
swapped in later without changing what is asserted.

Everything is built once per process (`load_corpus` is cached) and kept in memory only.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rerankd.connectors.base import IndexRecord
from rerankd.types import SparseVector

SCIFACT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact"

N_QUERIES = 30
N_DISTRACTORS = 300
#: Caller ids are deliberately not valid Qdrant ids (not an int, not a UUID), so the
#: connectors' id mapping is exercised and the round trip is observable.
ID_PREFIX = "scifact:"
GROUPS = ("alpha", "beta", "gamma")
HASH_DIM = 1 << 20

_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    (  # noqa: SIM905 - one line of words reads better than thirty lines of quotes
        "a an and are as at be by for from has have in is it its of on or that the this to "
        "was were which with not no than"
    ).split()
)


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    year: int
    group: str


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: frozenset[str]


@dataclass
class Corpus:
    docs: list[Doc]
    queries: list[Query]
    doc_dense: np.ndarray  # (n_docs, dim), L2-normalised
    query_dense: np.ndarray  # (n_queries, dim), L2-normalised
    doc_sparse: list[SparseVector]
    query_sparse: list[SparseVector]

    @property
    def dim(self) -> int:
        return int(self.doc_dense.shape[1])

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.docs]

    def records(self) -> list[IndexRecord]:
        return [
            IndexRecord(
                id=d.id,
                text=d.text,
                dense=self.doc_dense[i].tolist(),
                sparse=self.doc_sparse[i],
                payload={"year": d.year, "group": d.group},
            )
            for i, d in enumerate(self.docs)
        ]

    def mask(self, *, group: str | None = None, min_year: int | None = None) -> np.ndarray:
        """Which docs satisfy the test's payload filter (the reference for every DB's form)."""
        keep = np.ones(len(self.docs), dtype=bool)
        for i, d in enumerate(self.docs):
            if group is not None and d.group != group:
                keep[i] = False
            if min_year is not None and d.year < min_year:
                keep[i] = False
        return keep

    # -- brute-force references -------------------------------------------------------------

    def dense_scores(self, qi: int) -> np.ndarray:
        return self.doc_dense @ self.query_dense[qi]

    def sparse_scores(self, qi: int) -> np.ndarray:
        q = dict(zip(self.query_sparse[qi].indices, self.query_sparse[qi].values, strict=True))
        return np.array(
            [
                sum(q.get(i, 0.0) * v for i, v in zip(s.indices, s.values, strict=True))
                for s in self.doc_sparse
            ]
        )

    def reference(
        self, scores: np.ndarray, mask: np.ndarray | None = None, *, positive: bool = False
    ) -> dict[str, float]:
        """id -> score over the eligible docs; `positive` drops docs sharing no query term."""
        return {
            d.id: float(scores[i])
            for i, d in enumerate(self.docs)
            if (mask is None or mask[i]) and (not positive or scores[i] > 0)
        }


def rrf(lists: Iterable[Sequence[str]], offset: float) -> dict[str, float]:
    """Reciprocal-rank fusion, score = Σ 1 / (offset + rank) with rank counted from 1.

    Milvus's RRFRanker(k) uses offset = k; Qdrant's RRF(k) uses 1 / (k + rank - 1), so
    offset = k - 1 (its default k = 2 gives 1 / (1 + rank)).
    """
    scores: dict[str, float] = defaultdict(float)
    for ids in lists:
        for rank, id_ in enumerate(ids, start=1):
            scores[id_] += 1.0 / (offset + rank)
    return dict(scores)


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP and len(t) > 1]


def hashed_tf_sparse(text: str) -> SparseVector:
    """The test's own sparse vector: 1 + log(tf) per term, terms hashed into 2^20 slots."""
    counts: Counter[int] = Counter(zlib.crc32(t.encode()) % HASH_DIM for t in tokens(text))
    indices = sorted(counts)
    return SparseVector(indices, [1.0 + math.log(counts[i]) for i in indices])


def _read_jsonl(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _embed(texts: list[str]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer

        from rerankd.engine.bundled import backbone_dir

        folder = backbone_dir("all-minilm-l6-v2")
    except Exception as e:  # the bundled backbone or sentence-transformers is missing
        pytest.skip(f"all-MiniLM-L6-v2 unavailable: {e}")
    model = SentenceTransformer(str(folder), device="cpu")
    # Texts are cut at 64 word pieces (the title and the abstract's opening): the test needs
    # real vectors, not the best ones, and on two CPU cores embedding dominates its time.
    model.max_seq_length = 64
    vecs = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(vecs, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _build() -> Corpus:
    corpus_path = SCIFACT_DIR / "corpus.jsonl"
    queries_path = SCIFACT_DIR / "queries.jsonl"
    qrels_path = SCIFACT_DIR / "qrels" / "test.tsv"

    qrels: dict[str, set[str]] = defaultdict(set)
    with qrels_path.open(encoding="utf-8") as fh:
        next(fh)  # header
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                qrels[qid].add(did)
    query_text = {q["_id"]: q["text"] for q in _read_jsonl(queries_path)}
    qids = sorted((q for q in qrels if q in query_text), key=int)[:N_QUERIES]
    relevant = set().union(*(qrels[q] for q in qids))

    picked: list[dict] = []
    n_other = 0
    for row in _read_jsonl(corpus_path):
        if row["_id"] in relevant:
            picked.append(row)
        elif n_other < N_DISTRACTORS:
            picked.append(row)
            n_other += 1
    # Synthetic payload to filter on: SciFact has no metadata, so year and group are
    # assigned round-robin (deterministic, and every filter keeps some relevant docs).
    docs = [
        Doc(
            id=ID_PREFIX + row["_id"],
            text=f"{row['title']}. {row['text']}".strip(),
            year=2000 + i % 20,
            group=GROUPS[i % len(GROUPS)],
        )
        for i, row in enumerate(picked)
    ]
    queries = [
        Query(qid, query_text[qid], frozenset(ID_PREFIX + d for d in qrels[qid])) for qid in qids
    ]
    dense = _embed([d.text for d in docs] + [q.text for q in queries])
    return Corpus(
        docs=docs,
        queries=queries,
        doc_dense=dense[: len(docs)],
        query_dense=dense[len(docs) :],
        doc_sparse=[hashed_tf_sparse(d.text) for d in docs],
        query_sparse=[hashed_tf_sparse(q.text) for q in queries],
    )


def load_corpus() -> Corpus:
    """The shared corpus, or a clean skip when the SciFact slice is not on this machine."""
    for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        if not (SCIFACT_DIR / p).is_file():
            pytest.skip(f"SciFact not found at {SCIFACT_DIR / p}")
    return _build()


def check_top_k(
    cands: Sequence[Any],
    reference: dict[str, float],
    k: int,
    *,
    tol: float = 1e-4,
    exact: bool = True,
) -> float:
    """Assert `cands` is a top-`k` of `reference` (id -> score over the eligible docs).

    Checks ranks 1..n, scores best first, each hit's score equal to the reference's for that
    id, and (when `exact`) that no eligible doc outside the hits scores higher than the
    lowest hit: a tie-robust "these are the right ids". Returns recall against the
    reference's own top-k, which is what an approximate index is held to.
    """
    assert [c.first_stage_rank for c in cands] == list(range(1, len(cands) + 1))
    scores = [c.first_stage_score for c in cands]
    assert all(a >= b - tol for a, b in itertools.pairwise(scores)), scores
    ids = [c.id for c in cands]
    assert len(set(ids)) == len(ids), ids
    for c in cands:
        assert c.id in reference, f"{c.id} is not eligible"
        assert abs(c.first_stage_score - reference[c.id]) <= tol * max(1.0, abs(reference[c.id]))
    expected = sorted(reference.items(), key=lambda kv: -kv[1])[:k]
    assert len(cands) == len(expected)
    if exact and cands:
        assert min(scores) >= expected[-1][1] - tol, (ids, expected)
    return len(set(ids) & {i for i, _ in expected}) / max(1, len(expected))
