"""The Weaviate connector, driven through the real `weaviate-client` over the wire.

No Weaviate server can run here, so the client talks to `WeaviateProtocolDouble` (a test
double: REST + gRPC on 127.0.0.1, see tests/doubles). The client's handshake (OIDC probe,
`/v1/meta`, gRPC health check) runs for real; only its best-effort "is there a newer client on
PyPI?" probe is switched off, because a test must not depend on pypi.org.

Every expected answer is computed here, independently of the double and of Weaviate: cosine
top-k in numpy, BM25 with Weaviate's published formula (cross-checked against `rank_bm25` when
that package is installed), and Weaviate's two hybrid fusions written out from their
definitions. The data is the shared SciFact slice with real all-MiniLM-L6-v2 vectors
(tests/integration/corpus_fixture.py). `TestRealWeaviate` runs the same checks against a real
server when WEAVIATE_URL is set.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import pytest

weaviate = pytest.importorskip("weaviate")

from weaviate.classes.config import DataType  # noqa: E402
from weaviate.classes.query import Filter  # noqa: E402
from weaviate.connect.v4 import ConnectionSync  # noqa: E402

from rerankd.connectors.base import ConnectorError, FirstStageQuery, IndexRecord  # noqa: E402
from rerankd.connectors.weaviate import WeaviateConnector  # noqa: E402
from rerankd.types import Candidate  # noqa: E402
from tests.doubles import WeaviateProtocolDouble  # noqa: E402
from tests.integration.corpus_fixture import Corpus, load_corpus  # noqa: E402

COLLECTION = "scifact_weaviate"  # the client capitalises it: Weaviate class "Scifact_weaviate"
CLASS = "Scifact_weaviate"
K = 10
#: Float32 on the wire and in Weaviate's arithmetic; float64 in the references.
TOL = 2e-4

# Weaviate's published BM25 settings and "en" stopword preset (used only for query terms).
K1, B = 1.2, 0.75
EN_STOPWORDS = frozenset(
    (
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    )
)
HYBRID_SUBSEARCH = 100  # each hybrid sub-search fetches max(100, limit) results


# -- independent references ---------------------------------------------------------------------


def word_tokens(text: str) -> list[str]:
    """Weaviate's "word" tokenization: lowercase, split on anything but letters and digits."""
    return re.findall(r"[^\W_]+", text.lower())


class BM25Reference:
    """BM25 as Weaviate scores it (bm25_searcher.go): Lucene idf, no (k1 + 1) factor."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.docs = [Counter(word_tokens(t)) for t in texts]
        self.lengths = np.array([sum(c.values()) for c in self.docs], dtype=float)
        self.avg = float(self.lengths.mean())
        self.df: Counter[str] = Counter()
        for c in self.docs:
            self.df.update(c.keys())

    def idf(self, term: str) -> float:
        n, total = self.df[term], len(self.docs)
        return math.log(1 + (total - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> np.ndarray:
        terms = Counter(t for t in word_tokens(query) if t not in EN_STOPWORDS)
        out = np.zeros(len(self.docs))
        for term, repeats in terms.items():
            if not self.df[term]:
                continue
            idf = self.idf(term) * repeats
            for i, c in enumerate(self.docs):
                f = c[term]
                if f:
                    out[i] += idf * f / (f + K1 * (1 - B + B * self.lengths[i] / self.avg))
        return out


def relative_score_fusion(
    sets: Sequence[Sequence[tuple[str, float]]], weights: Sequence[float]
) -> dict[str, float]:
    """Each result set min-max normalised to [0, 1] (all-equal sets count fully), weighted."""
    fused: dict[str, float] = defaultdict(float)
    for results, w in zip(sets, weights, strict=True):
        if not results:
            continue
        hi, lo = max(s for _, s in results), min(s for _, s in results)
        for id_, s in results:
            fused[id_] += w if hi == lo else w * (s - lo) / (hi - lo)
    return dict(fused)


def ranked_fusion(
    sets: Sequence[Sequence[tuple[str, float]]], weights: Sequence[float]
) -> dict[str, float]:
    """Reciprocal rank fusion as Weaviate does it: weight / (60 + rank), rank from 0."""
    fused: dict[str, float] = defaultdict(float)
    for results, w in zip(sets, weights, strict=True):
        for rank, (id_, _) in enumerate(results):
            fused[id_] += w / (60 + rank)
    return dict(fused)


def expected_hybrid(
    corpus: Corpus,
    bm25: BM25Reference,
    qi: int,
    *,
    alpha: float,
    fusion: str,
    limit: int,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Fused scores of every doc that reaches the fusion (not truncated to `limit`)."""
    sub = max(HYBRID_SUBSEARCH, limit)
    sets, weights = [], []
    if alpha < 1:
        sets.append(top_k(corpus, bm25.scores(corpus.queries[qi].text), sub, mask, positive=True))
        weights.append(1 - alpha)
    if alpha > 0:
        # vector score = 1 - cosine distance = cosine similarity
        sets.append(top_k(corpus, cosine(corpus, qi), sub, mask))
        weights.append(alpha)
    fuse = relative_score_fusion if fusion == "relative_score" else ranked_fusion
    return fuse(sets, weights)


def assert_top_k(
    got: Sequence[Candidate], reference: dict[str, float], limit: int, tol: float = TOL
) -> None:
    """`got` is the reference's top `limit`, best first, each with its reference score.

    Ties closer than `tol` may come back in either order (float32 on the wire), so the check
    is: every returned id has its reference score, the scores are the best `limit` reference
    scores in order, and no id outside the result beats the last returned one by > tol.
    """
    best = sorted(reference.values(), reverse=True)[:limit]
    assert len(got) == len(best), (len(got), len(best))
    for rank, (cand, want) in enumerate(zip(got, best, strict=True), start=1):
        assert cand.first_stage_rank == rank
        assert cand.id in reference, cand.id
        assert cand.first_stage_score == pytest.approx(reference[cand.id], abs=tol), cand.id
        assert cand.first_stage_score == pytest.approx(want, abs=tol), (rank, cand.id)
    returned = {c.id for c in got}
    floor = got[-1].first_stage_score if got else math.inf
    missed = {i: s for i, s in reference.items() if i not in returned and s > floor + tol}
    assert not missed, f"better docs left out: {missed}"


def cosine(corpus: Corpus, qi: int) -> np.ndarray:
    """Cosine similarity of query `qi` to every doc (the fixture's vectors are unit length)."""
    docs = corpus.doc_dense / np.linalg.norm(corpus.doc_dense, axis=1, keepdims=True)
    q = corpus.query_dense[qi] / np.linalg.norm(corpus.query_dense[qi])
    return docs.astype(np.float64) @ q.astype(np.float64)


def score_of(corpus: Corpus, scores: np.ndarray) -> dict[str, float]:
    return {d.id: float(scores[i]) for i, d in enumerate(corpus.docs)}


def top_k(
    corpus: Corpus,
    scores: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    *,
    positive: bool = False,
) -> list[tuple[str, float]]:
    """Best `k` (id, score) under `mask`; `positive` keeps only docs sharing a query term."""
    out = []
    for i in np.argsort(-scores, kind="stable"):
        if (mask is not None and not mask[i]) or (positive and scores[i] <= 0):
            continue
        out.append((corpus.docs[i].id, float(scores[i])))
        if len(out) == k:
            break
    return out


def qvec(corpus: Corpus, qi: int) -> list[float]:
    return corpus.query_dense[qi].tolist()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


@pytest.fixture(scope="module")
def bm25(corpus: Corpus) -> BM25Reference:
    return BM25Reference([d.text for d in corpus.docs])


@pytest.fixture(scope="module")
def double() -> Iterator[WeaviateProtocolDouble]:
    with WeaviateProtocolDouble() as d:
        yield d


def connect(double: WeaviateProtocolDouble) -> weaviate.WeaviateClient:
    """The real client with its init checks on (OIDC probe, meta, gRPC health) but no PyPI."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConnectionSync, "_check_package_version", lambda self, colour: None)
        return weaviate.connect_to_custom(
            http_host="127.0.0.1",
            http_port=double.http_port,
            http_secure=False,
            grpc_host="127.0.0.1",
            grpc_port=double.grpc_port,
            grpc_secure=False,
            skip_init_checks=False,
        )


@pytest.fixture(scope="module")
def client(double: WeaviateProtocolDouble) -> Iterator[weaviate.WeaviateClient]:
    c = connect(double)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def indexed(client: weaviate.WeaviateClient, corpus: Corpus) -> WeaviateConnector:
    conn = WeaviateConnector(client, alpha=0.5)
    conn.create_collection(
        COLLECTION,
        dense_dim=corpus.dim,
        payload_schema={"year": DataType.INT, "group": DataType.TEXT},
    )
    conn.upsert(COLLECTION, corpus.records())
    return conn


@pytest.fixture()
def double_fresh(double: WeaviateProtocolDouble) -> WeaviateProtocolDouble:
    """The shared double with its request log emptied, so a test sees only its own calls."""
    double.reset_records()
    return double


# -- handshake, schema, indexing ----------------------------------------------------------------


def test_handshake_and_created_schema(
    indexed: WeaviateConnector, double: WeaviateProtocolDouble
) -> None:
    assert double.health_checks >= 1  # the client's gRPC init check reached the double
    schema = double.schema(CLASS)
    props = {p["name"]: p for p in schema["properties"]}
    assert props["text"]["dataType"] == ["text"]
    assert props["text"]["tokenization"] == "word" and props["text"]["indexSearchable"]
    assert props["rerankd_id"]["tokenization"] == "field"
    assert not props["rerankd_id"]["indexSearchable"]
    assert props["year"]["dataType"] == ["int"]
    assert schema["vectorConfig"] == {
        "default": {
            "vectorizer": {"none": {}},
            "vectorIndexType": "hnsw",
            "vectorIndexConfig": {"distance": "cosine"},
        }
    }


def test_upsert_stores_uuid5_ids_vectors_and_is_idempotent(
    indexed: WeaviateConnector, double: WeaviateProtocolDouble, corpus: Corpus
) -> None:
    stored = double.objects(CLASS)
    assert set(stored) == {WeaviateConnector.uuid_for(d.id) for d in corpus.docs}
    for u in stored:
        assert u.version == 5
    vectors = double.vectors(CLASS)
    doc = corpus.docs[7]
    u = WeaviateConnector.uuid_for(doc.id)
    assert stored[u] == {
        "text": doc.text,
        "rerankd_id": doc.id,
        "year": doc.year,
        "group": doc.group,
    }
    np.testing.assert_allclose(vectors[u]["default"], corpus.doc_dense[7], rtol=0, atol=1e-7)

    # Upserting the same ids again replaces, never duplicates.
    records = corpus.records()[:5]
    changed = [
        IndexRecord(id=r.id, text=r.text, dense=r.dense, payload={**r.payload, "year": 1999})
        for r in records
    ]
    indexed.upsert(COLLECTION, changed)
    after = double.objects(CLASS)
    assert len(after) == len(corpus.docs)
    assert all(after[WeaviateConnector.uuid_for(r.id)]["year"] == 1999 for r in records)
    indexed.upsert(COLLECTION, records)  # restore for the other tests
    assert (
        double.objects(CLASS)[WeaviateConnector.uuid_for(records[0].id)]["year"]
        == records[0].payload["year"]
    )


def test_ids_text_and_payload_round_trip(indexed: WeaviateConnector, corpus: Corpus) -> None:
    for i in range(0, len(corpus.docs), 37):
        doc = corpus.docs[i]
        got = indexed.first_stage(
            COLLECTION,
            FirstStageQuery(text="", mode="dense", dense=corpus.doc_dense[i].tolist()),
            limit=1,
        )
        assert [c.id for c in got] == [doc.id]
        assert got[0].text == doc.text
        assert got[0].payload == {"year": doc.year, "group": doc.group}
        assert type(got[0].payload["year"]) is int
        assert got[0].first_stage_score == pytest.approx(1.0, abs=1e-5)


# -- the three modes against the references -----------------------------------------------------


def test_dense_is_exact_cosine_top_k(
    indexed: WeaviateConnector, corpus: Corpus, double_fresh: WeaviateProtocolDouble
) -> None:
    for qi in range(len(corpus.queries)):
        got = indexed.first_stage(
            COLLECTION,
            FirstStageQuery(text=corpus.queries[qi].text, mode="dense", dense=qvec(corpus, qi)),
            limit=K,
        )
        assert_top_k(got, score_of(corpus, cosine(corpus, qi)), K)
    sent = double_fresh.searches
    assert len(sent) == len(corpus.queries)
    last = sent[-1]
    assert (last.kind, last.limit, last.filters, last.target_vectors) == (
        "near_vector",
        K,
        None,
        ("default",),
    )
    np.testing.assert_allclose(last.vector, corpus.query_dense[-1], rtol=0, atol=1e-7)
    assert "distance" in last.return_metadata


def test_sparse_is_weaviate_bm25(
    indexed: WeaviateConnector,
    corpus: Corpus,
    bm25: BM25Reference,
    double_fresh: WeaviateProtocolDouble,
) -> None:
    for qi, q in enumerate(corpus.queries):
        got = indexed.first_stage(COLLECTION, FirstStageQuery(text=q.text, mode="sparse"), limit=K)
        reference = {i: s for i, s in score_of(corpus, bm25.scores(q.text)).items() if s > 0}
        assert_top_k(got, reference, min(K, len(reference)))
        rec = double_fresh.searches[qi]
        assert (rec.kind, rec.query, rec.query_properties, rec.limit) == (
            "bm25",
            q.text,
            ("text",),
            K,
        )
        assert rec.vector is None


@pytest.mark.parametrize(
    ("alpha", "fusion"), [(0.5, "relative_score"), (0.25, "relative_score"), (0.8, "ranked")]
)
def test_hybrid_is_weaviate_fusion(
    client: weaviate.WeaviateClient,
    indexed: WeaviateConnector,
    corpus: Corpus,
    bm25: BM25Reference,
    alpha: float,
    fusion: str,
    double_fresh: WeaviateProtocolDouble,
) -> None:
    conn = WeaviateConnector(client, alpha=alpha, fusion=fusion)
    for qi in range(0, len(corpus.queries), 3):
        q = corpus.queries[qi]
        got = conn.first_stage(
            COLLECTION,
            FirstStageQuery(text=q.text, mode="hybrid", dense=qvec(corpus, qi)),
            limit=K,
        )
        reference = expected_hybrid(corpus, bm25, qi, alpha=alpha, fusion=fusion, limit=K)
        assert_top_k(got, reference, K, tol=1e-4 if fusion == "ranked" else TOL)
        rec = double_fresh.searches[-1]
        assert rec.kind == "hybrid" and rec.query == q.text and rec.fusion == fusion
        assert rec.alpha == pytest.approx(alpha, abs=1e-7)
        assert rec.query_properties == ("text",) and rec.target_vectors == ("default",)
        assert rec.limit == K and "score" in rec.return_metadata
        np.testing.assert_allclose(rec.vector, corpus.query_dense[qi], rtol=0, atol=1e-7)


# -- filters and limits -------------------------------------------------------------------------

BETA_RECENT = Filter.by_property("group").equal("beta") & Filter.by_property(
    "year"
).greater_or_equal(2010)
BETA_RECENT_JSON = {
    "op": "and",
    "filters": [
        {"op": "equal", "property": "group", "value": "beta"},
        {"op": "greater_or_equal", "property": "year", "value": 2010},
    ],
}


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_filter_is_passed_through_and_holds(
    mode: str,
    indexed: WeaviateConnector,
    corpus: Corpus,
    bm25: BM25Reference,
    double_fresh: WeaviateProtocolDouble,
) -> None:
    mask = corpus.mask(group="beta", min_year=2010)
    allowed = {d.id for d, keep in zip(corpus.docs, mask, strict=True) if keep}
    for qi in (0, 4, 11, 23):
        q = corpus.queries[qi]
        got = indexed.first_stage(
            COLLECTION,
            FirstStageQuery(text=q.text, mode=mode, dense=qvec(corpus, qi)),
            limit=K,
            filter=BETA_RECENT,
        )
        assert got and {c.id for c in got} <= allowed
        if mode == "dense":
            reference = dict(top_k(corpus, cosine(corpus, qi), len(corpus.docs), mask))
        elif mode == "sparse":
            reference = dict(
                top_k(corpus, bm25.scores(q.text), len(corpus.docs), mask, positive=True)
            )
        else:
            reference = expected_hybrid(
                corpus, bm25, qi, alpha=0.5, fusion="relative_score", limit=K, mask=mask
            )
        assert_top_k(got, reference, min(K, len(reference)))
        assert double_fresh.searches[-1].filters == BETA_RECENT_JSON


def test_or_filter_and_text_equality(indexed: WeaviateConnector, corpus: Corpus) -> None:
    either = Filter.by_property("year").less_than(2002) | Filter.by_property("group").equal("gamma")
    got = indexed.first_stage(
        COLLECTION,
        FirstStageQuery(text="", mode="dense", dense=qvec(corpus, 3)),
        limit=300,
        filter=either,
    )
    keep = [d.year < 2002 or d.group == "gamma" for d in corpus.docs]
    assert {c.id for c in got} == {d.id for d, k in zip(corpus.docs, keep, strict=True) if k}

    one = corpus.docs[42]
    by_id = Filter.by_property("rerankd_id").equal(one.id)  # field tokenization: exact id
    got = indexed.first_stage(
        COLLECTION,
        FirstStageQuery(text="", mode="dense", dense=qvec(corpus, 0)),
        limit=5,
        filter=by_id,
    )
    assert [c.id for c in got] == [one.id]


@pytest.mark.parametrize("limit", [1, 3, 25, 100])
@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_limit_is_honoured(
    mode: str,
    limit: int,
    indexed: WeaviateConnector,
    corpus: Corpus,
    bm25: BM25Reference,
    double_fresh: WeaviateProtocolDouble,
) -> None:
    q = corpus.queries[5]
    got = indexed.first_stage(
        COLLECTION, FirstStageQuery(text=q.text, mode=mode, dense=qvec(corpus, 5)), limit=limit
    )
    available = int((bm25.scores(q.text) > 0).sum()) if mode == "sparse" else len(corpus.docs)
    assert len(got) == min(limit, available)
    assert [c.first_stage_rank for c in got] == list(range(1, len(got) + 1))
    scores = [c.first_stage_score for c in got]
    assert scores == sorted(scores, reverse=True)
    assert double_fresh.searches[-1].limit == limit


# -- errors -------------------------------------------------------------------------------------


def test_missing_collection_names_db_and_collection(
    indexed: WeaviateConnector, corpus: Corpus
) -> None:
    for mode in ("dense", "sparse", "hybrid"):
        with pytest.raises(ConnectorError) as err:
            indexed.first_stage(
                "no_such_collection",
                FirstStageQuery(text="x", mode=mode, dense=qvec(corpus, 0)),
                limit=3,
            )
        assert (err.value.db, err.value.collection) == ("weaviate", "no_such_collection")
        assert "weaviate" in str(err.value) and "no_such_collection" in str(err.value)
        assert "could not find class No_such_collection" in str(err.value)
    with pytest.raises(ConnectorError) as err:
        indexed.upsert("no_such_collection", corpus.records()[:1])
    assert err.value.collection == "no_such_collection"


def test_unsupported_or_invalid_filters_are_errors_not_ignored(
    indexed: WeaviateConnector, corpus: Corpus, double_fresh: WeaviateProtocolDouble
) -> None:
    query = FirstStageQuery(text="cancer", mode="sparse")
    with pytest.raises(ConnectorError, match="does not support the like filter operator"):
        indexed.first_stage(
            COLLECTION, query, limit=3, filter=Filter.by_property("text").like("canc*")
        )
    with pytest.raises(ConnectorError, match="no such prop with name 'nope'"):
        indexed.first_stage(COLLECTION, query, limit=3, filter=Filter.by_property("nope").equal(1))
    with pytest.raises(ConnectorError, match='cannot use "valueText" on type "int"'):
        indexed.first_stage(
            COLLECTION, query, limit=3, filter=Filter.by_property("year").equal("2001")
        )
    assert len(double_fresh.errors) == 3
    with pytest.raises(TypeError):
        indexed.first_stage(COLLECTION, query, limit=3, filter={"year": 2001})


def test_double_refuses_what_it_does_not_implement(
    client: weaviate.WeaviateClient, indexed: WeaviateConnector
) -> None:
    """The double answers "not supported" instead of quietly ignoring a request field."""
    from weaviate.classes.query import GroupBy, Sort
    from weaviate.exceptions import WeaviateQueryError

    coll = client.collections.use(COLLECTION)
    with pytest.raises(WeaviateQueryError, match=r"does not support SearchRequest\.autocut"):
        coll.query.bm25(query="cancer", auto_limit=1)
    with pytest.raises(WeaviateQueryError, match=r"does not support SearchRequest\.sort_by"):
        coll.query.fetch_objects(sort=Sort.by_property("year"))
    with pytest.raises(WeaviateQueryError, match=r"does not support SearchRequest\.group_by"):
        coll.query.bm25(
            query="cancer", group_by=GroupBy(prop="group", number_of_groups=2, objects_per_group=2)
        )


def test_argument_errors_stay_local(indexed: WeaviateConnector) -> None:
    with pytest.raises(ValueError):
        indexed.first_stage(COLLECTION, FirstStageQuery(text="x", mode="dense"), limit=3)
    with pytest.raises(ValueError):
        indexed.first_stage(COLLECTION, FirstStageQuery(text="x", mode="sparse"), limit=0)
    with pytest.raises(ValueError):
        indexed.first_stage(COLLECTION, FirstStageQuery(text="x", mode="both"), limit=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WeaviateConnector(indexed.client, alpha=1.5)


# -- the references themselves, and the newer wire encoding -------------------------------------


def test_bm25_reference_agrees_with_rank_bm25(corpus: Corpus, bm25: BM25Reference) -> None:
    """rank_bm25's Okapi with Lucene's idf is Weaviate's BM25 times (k1 + 1)."""
    rank_bm25 = pytest.importorskip("rank_bm25")

    class LuceneIdf(rank_bm25.BM25Okapi):
        def _calc_idf(self, nd: dict[str, int]) -> None:
            self.idf = {
                w: math.log(1 + (self.corpus_size - n + 0.5) / (n + 0.5)) for w, n in nd.items()
            }

    ref = LuceneIdf([word_tokens(d.text) for d in corpus.docs], k1=K1, b=B)
    for q in corpus.queries[:10]:
        terms = [t for t in word_tokens(q.text) if t not in EN_STOPWORDS]
        np.testing.assert_allclose(
            ref.get_scores(terms) / (K1 + 1), bm25.scores(q.text), rtol=1e-9, atol=1e-12
        )


def test_alpha_param_encoding_of_newer_servers(corpus: Corpus) -> None:
    """Servers >= 1.36.6 get `alpha_param`; the double must read it, and alpha must arrive."""
    with WeaviateProtocolDouble(version="1.36.9") as d:
        c = connect(d)
        try:
            conn = WeaviateConnector(c, alpha=0.0)
            conn.create_collection("alpha_check", dense_dim=corpus.dim)
            conn.upsert("alpha_check", corpus.records()[:20])
            q = corpus.queries[0]
            got = conn.first_stage(
                "alpha_check",
                FirstStageQuery(text=q.text, mode="hybrid", dense=qvec(corpus, 0)),
                limit=5,
            )
        finally:
            c.close()
    rec = d.searches[-1]
    assert rec.raw.hybrid_search.use_alpha_param and rec.raw.hybrid_search.HasField("alpha_param")
    assert rec.alpha == 0.0
    # alpha = 0: pure keyword, every returned doc shares a term with the query.
    bm = BM25Reference([x.text for x in corpus.docs[:20]])
    positive = {corpus.docs[i].id for i, s in enumerate(bm.scores(q.text)) if s > 0}
    assert got and {c.id for c in got} <= positive


# -- a real server, when there is one -----------------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("WEAVIATE_URL"),
    reason="WEAVIATE_URL not set: no real Weaviate server to test against",
)
class TestRealWeaviate:
    """The same claims against a real Weaviate (WEAVIATE_URL=http://host:8080, gRPC port from
    WEAVIATE_GRPC_PORT, default 50051). HNSW is approximate, so dense results are compared by
    recall rather than exactly."""

    @pytest.fixture(scope="class")
    def real(self, corpus: Corpus) -> Iterator[tuple[WeaviateConnector, str]]:
        url = urlparse(os.environ["WEAVIATE_URL"])
        secure = url.scheme == "https"
        client = weaviate.connect_to_custom(
            http_host=url.hostname or "localhost",
            http_port=url.port or (443 if secure else 8080),
            http_secure=secure,
            grpc_host=url.hostname or "localhost",
            grpc_port=int(os.environ.get("WEAVIATE_GRPC_PORT", "50051")),
            grpc_secure=secure,
        )
        name = f"rerankd_test_{uuid.uuid4().hex[:8]}"
        conn = WeaviateConnector(client)
        try:
            conn.create_collection(
                name,
                dense_dim=corpus.dim,
                payload_schema={"year": DataType.INT, "group": DataType.TEXT},
            )
            conn.upsert(name, corpus.records())
            yield conn, name
        finally:
            client.collections.delete(name)
            client.close()

    def test_dense_recall(self, real: tuple[WeaviateConnector, str], corpus: Corpus) -> None:
        conn, name = real
        hits = 0
        for qi in range(len(corpus.queries)):
            got = conn.first_stage(
                name, FirstStageQuery(text="", mode="dense", dense=qvec(corpus, qi)), limit=K
            )
            want = {i for i, _ in top_k(corpus, cosine(corpus, qi), K)}
            hits += len({c.id for c in got} & want)
        assert hits / (K * len(corpus.queries)) >= 0.95

    def test_sparse_matches_reference(
        self, real: tuple[WeaviateConnector, str], corpus: Corpus, bm25: BM25Reference
    ) -> None:
        conn, name = real
        for q in corpus.queries[:10]:
            got = conn.first_stage(name, FirstStageQuery(text=q.text, mode="sparse"), limit=K)
            reference = {i: s for i, s in score_of(corpus, bm25.scores(q.text)).items() if s > 0}
            assert_top_k(got, reference, min(K, len(reference)), tol=1e-3)

    def test_filter_and_missing_collection(
        self, real: tuple[WeaviateConnector, str], corpus: Corpus
    ) -> None:
        conn, name = real
        mask = corpus.mask(group="beta", min_year=2010)
        allowed = {d.id for d, keep in zip(corpus.docs, mask, strict=True) if keep}
        got = conn.first_stage(
            name,
            FirstStageQuery(text=corpus.queries[0].text, mode="hybrid", dense=qvec(corpus, 0)),
            limit=K,
            filter=BETA_RECENT,
        )
        assert got and {c.id for c in got} <= allowed
        with pytest.raises(ConnectorError) as err:
            conn.first_stage(
                "no_such_collection_rerankd", FirstStageQuery(text="x", mode="sparse"), limit=3
            )
        assert err.value.db == "weaviate"
