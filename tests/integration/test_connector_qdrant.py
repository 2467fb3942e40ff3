"""QdrantConnector against real Qdrant engines: in memory, on disk, and a server if given.

Every check compares with references computed in numpy from the same vectors (brute-force
cosine, sparse dot products, RRF/DBSF of independently obtained lists), so a wrong mapping,
a dropped filter or a mis-fused list fails here. `TestQdrantServer` runs the same contract
against a real server when `QDRANT_URL` is set (e.g. http://127.0.0.1:6333).
"""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from rerankd.connectors.base import ConnectorError, FirstStageQuery, IndexRecord
from rerankd.errors import InvalidInputError
from rerankd.types import SparseVector
from tests.integration.corpus_fixture import Corpus, check_top_k, load_corpus, rrf

pytest.importorskip("qdrant_client")
from qdrant_client import QdrantClient, models

from rerankd.connectors.qdrant import ID_FIELD, QdrantConnector, point_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

K = 10
MODES = ("dense", "sparse", "hybrid")


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return load_corpus()


def fsq(corpus: Corpus, qi: int, mode: str) -> FirstStageQuery:
    return FirstStageQuery(
        text=corpus.queries[qi].text,
        mode=mode,  # type: ignore[arg-type]
        dense=corpus.query_dense[qi].tolist(),
        sparse=corpus.query_sparse[qi],
    )


def dbsf(lists: list[list[tuple[str, float]]]) -> dict[str, float]:
    """Distribution-based score fusion as Qdrant defines it: each list's scores mapped from
    [mean - 3σ, mean + 3σ] (sample σ) to [0, 1], then summed per id."""
    fused: dict[str, float] = {}
    for hits in lists:
        if not hits:
            continue
        scores = [s for _, s in hits]
        if len(scores) == 1 or statistics.variance(scores) == 0:
            norm = [0.5] * len(scores)
        else:
            mean, sd = statistics.fmean(scores), statistics.stdev(scores)
            norm = [(s - (mean - 3 * sd)) / (6 * sd) for s in scores]
        for (id_, _), n in zip(hits, norm, strict=True):
            fused[id_] = fused.get(id_, 0.0) + n
    return fused


class QdrantContract:
    """The checks every Qdrant deployment must pass; subclasses provide `client`."""

    #: Whether kNN is exact (local mode, and small collections on a server are brute force).
    exact = True

    @pytest.fixture(scope="class")
    def indexed(
        self, client: QdrantClient, corpus: Corpus
    ) -> Iterator[tuple[QdrantConnector, str]]:
        conn = QdrantConnector(client)
        name = f"rerankd_test_{uuid.uuid4().hex[:8]}"
        conn.create_collection(name, dense_dim=corpus.dim, recreate=True)
        conn.upsert(name, corpus.records())
        yield conn, name
        client.delete_collection(name)

    # -- the right ids in each mode ---------------------------------------------------------

    def test_dense_matches_brute_force_cosine(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        for qi in range(len(corpus.queries)):
            cands = conn.first_stage(name, fsq(corpus, qi, "dense"), limit=K)
            ref = corpus.reference(corpus.dense_scores(qi))
            check_top_k(cands, ref, K, exact=self.exact)

    def test_sparse_matches_brute_force_dot_product(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        for qi in range(len(corpus.queries)):
            cands = conn.first_stage(name, fsq(corpus, qi, "sparse"), limit=K)
            ref = corpus.reference(corpus.sparse_scores(qi), positive=True)
            check_top_k(cands, ref, K)

    def test_hybrid_is_rrf_of_the_two_lists(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        for qi in range(len(corpus.queries)):
            # The two lists come from single-mode queries, themselves checked against brute
            # force here, so Qdrant's tie order inside a list is the one it fuses with.
            dense = conn.first_stage(name, fsq(corpus, qi, "dense"), limit=K)
            sparse = conn.first_stage(name, fsq(corpus, qi, "sparse"), limit=K)
            check_top_k(dense, corpus.reference(corpus.dense_scores(qi)), K, exact=self.exact)
            check_top_k(sparse, corpus.reference(corpus.sparse_scores(qi), positive=True), K)
            # Qdrant's default RRF: 1 / (k + rank - 1) with k = 2, i.e. offset 1.
            fused = rrf([[c.id for c in dense], [c.id for c in sparse]], offset=1)
            cands = conn.first_stage(name, fsq(corpus, qi, "hybrid"), limit=K)
            check_top_k(cands, fused, K, tol=1e-6)

    def test_hybrid_rrf_k_is_used(self, client, indexed, corpus: Corpus) -> None:
        _, name = indexed
        conn = QdrantConnector(client, rrf_k=60)
        for qi in range(0, len(corpus.queries), 3):
            dense = conn.first_stage(name, fsq(corpus, qi, "dense"), limit=K)
            sparse = conn.first_stage(name, fsq(corpus, qi, "sparse"), limit=K)
            fused = rrf([[c.id for c in dense], [c.id for c in sparse]], offset=59)
            check_top_k(conn.first_stage(name, fsq(corpus, qi, "hybrid"), limit=K), fused, K)

    def test_hybrid_dbsf(self, client, indexed, corpus: Corpus) -> None:
        _, name = indexed
        conn = QdrantConnector(client, fusion="dbsf")
        for qi in range(len(corpus.queries)):
            lists = [
                [
                    (c.id, c.first_stage_score)
                    for c in conn.first_stage(name, fsq(corpus, qi, m), limit=K)
                ]
                for m in ("dense", "sparse")
            ]
            cands = conn.first_stage(name, fsq(corpus, qi, "hybrid"), limit=K)
            check_top_k(cands, dbsf(lists), K, tol=1e-4)

    @pytest.mark.parametrize("mode", MODES)
    def test_relevant_docs_are_retrieved(self, indexed, corpus: Corpus, mode: str) -> None:
        conn, name = indexed
        found = 0
        for qi, q in enumerate(corpus.queries):
            ids = {c.id for c in conn.first_stage(name, fsq(corpus, qi, mode), limit=K)}
            found += bool(ids & q.relevant)
        # MiniLM alone finds a relevant abstract in the top 10 for 28 of these 30 queries.
        assert found / len(corpus.queries) >= 0.75, (mode, found)

    # -- filters, limits, ids ----------------------------------------------------------------

    @pytest.mark.parametrize("mode", MODES)
    def test_filter_holds(self, indexed, corpus: Corpus, mode: str) -> None:
        conn, name = indexed
        flt = models.Filter(
            must=[
                models.FieldCondition(key="group", match=models.MatchValue(value="beta")),
                models.FieldCondition(key="year", range=models.Range(gte=2010)),
            ]
        )
        mask = corpus.mask(group="beta", min_year=2010)
        allowed = {d.id for d, keep in zip(corpus.docs, mask, strict=True) if keep}
        assert 0 < len(allowed) < len(corpus.docs) / 3
        n_hits = 0
        for qi in range(len(corpus.queries)):
            cands = conn.first_stage(name, fsq(corpus, qi, mode), limit=K, filter=flt)
            n_hits += len(cands)
            for c in cands:
                assert c.id in allowed
                assert c.payload["group"] == "beta" and c.payload["year"] >= 2010
            if mode == "dense":  # the filtered kNN is the brute force over allowed docs
                check_top_k(cands, corpus.reference(corpus.dense_scores(qi), mask), K)
        assert n_hits > 0

    def test_filter_as_dict_is_accepted(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        flt = {"must": [{"key": "group", "match": {"value": "gamma"}}]}
        cands = conn.first_stage(name, fsq(corpus, 0, "dense"), limit=K, filter=flt)
        assert len(cands) == K and all(c.payload["group"] == "gamma" for c in cands)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("limit", [1, 3, 25])
    def test_limit_is_honoured(self, indexed, corpus: Corpus, mode: str, limit: int) -> None:
        conn, name = indexed
        cands = conn.first_stage(name, fsq(corpus, 0, mode), limit=limit)
        n_sparse = len(corpus.reference(corpus.sparse_scores(0), positive=True))
        assert n_sparse >= 25
        assert len(cands) == limit
        assert [c.first_stage_rank for c in cands] == list(range(1, limit + 1))

    def test_ids_payload_and_text_round_trip(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        by_id = {d.id: d for d in corpus.docs}
        seen = set()
        for qi in range(len(corpus.queries)):
            for c in conn.first_stage(name, fsq(corpus, qi, "hybrid"), limit=K):
                doc = by_id[c.id]  # the caller's string id, not the UUID Qdrant stores
                assert c.text == doc.text
                assert c.payload == {"year": doc.year, "group": doc.group}
                seen.add(c.id)
        assert len(seen) > K
        point = indexed[0].client.retrieve(name, [point_id(corpus.docs[0].id)], with_payload=True)
        assert point[0].payload[ID_FIELD] == corpus.docs[0].id

    # -- writes -----------------------------------------------------------------------------

    def test_upsert_twice_is_idempotent(self, indexed, corpus: Corpus) -> None:
        conn, name = indexed
        before = conn.first_stage(name, fsq(corpus, 1, "hybrid"), limit=K)
        conn.upsert(name, corpus.records())
        assert conn.client.count(name, exact=True).count == len(corpus.docs)
        assert conn.first_stage(name, fsq(corpus, 1, "hybrid"), limit=K) == before

    def test_upsert_replaces_by_id(self, client, corpus: Corpus) -> None:
        conn = QdrantConnector(client)
        name = f"rerankd_scratch_{uuid.uuid4().hex[:8]}"
        conn.create_collection(name, dense_dim=corpus.dim)
        try:
            records = corpus.records()[:5]
            conn.upsert(name, records)
            conn.upsert(name, records)
            assert client.count(name, exact=True).count == 5
            r0 = records[0]
            changed = IndexRecord(r0.id, "replaced text", r0.dense, r0.sparse, {"year": 1999})
            conn.upsert(name, [changed])
            assert client.count(name, exact=True).count == 5
            q = FirstStageQuery("q", "dense", dense=r0.dense)
            top = conn.first_stage(name, q, limit=1)[0]
            assert (top.id, top.text, top.payload) == (r0.id, "replaced text", {"year": 1999})
            # create_collection without recreate keeps what is there (re-runnable scripts)
            conn.create_collection(name, dense_dim=corpus.dim)
            assert client.count(name, exact=True).count == 5
            conn.create_collection(name, dense_dim=corpus.dim, recreate=True)
            assert client.count(name, exact=True).count == 0
        finally:
            client.delete_collection(name)

    # -- errors -----------------------------------------------------------------------------

    @pytest.mark.parametrize("mode", MODES)
    def test_missing_collection_is_connector_error(self, client, corpus: Corpus, mode) -> None:
        conn = QdrantConnector(client)
        with pytest.raises(ConnectorError) as info:
            conn.first_stage("no_such_collection", fsq(corpus, 0, mode), limit=K)
        err = info.value
        assert (err.db, err.collection) == ("qdrant", "no_such_collection")
        assert "qdrant" in str(err) and "no_such_collection" in str(err)
        with pytest.raises(ConnectorError, match="no_such_collection"):
            conn.upsert("no_such_collection", corpus.records()[:1])

    @pytest.mark.parametrize("bad", [{"must": 3}, "group == 'beta'"])
    def test_bad_filter_is_connector_error(self, indexed, corpus: Corpus, bad) -> None:
        conn, name = indexed
        with pytest.raises(ConnectorError) as info:
            conn.first_stage(name, fsq(corpus, 0, "dense"), limit=K, filter=bad)
        assert (info.value.db, info.value.collection) == ("qdrant", name)

    def test_missing_query_vector_is_the_callers_error(self, indexed) -> None:
        conn, name = indexed
        with pytest.raises(InvalidInputError, match="sparse"):
            conn.first_stage(name, FirstStageQuery("q", "hybrid", dense=[0.0] * 384), limit=K)
        with pytest.raises(ValueError, match="mode"):
            conn.first_stage(name, FirstStageQuery("q", "bm25"), limit=K)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="reserved"):
            conn.upsert(
                name, [IndexRecord("x", "t", [0.0] * 384, SparseVector([], []), {ID_FIELD: 1})]
            )


class TestQdrantLocal(QdrantContract):
    """qdrant-client's embedded engine, both in memory and persisted to a folder."""

    @pytest.fixture(scope="class", params=["memory", "disk"])
    def client(self, request, tmp_path_factory) -> Iterator[QdrantClient]:
        if request.param == "memory":
            c = QdrantClient(":memory:")
        else:
            c = QdrantClient(path=str(tmp_path_factory.mktemp("qdrant")))
        yield c
        c.close()

    def test_on_disk_collection_survives_reopen(self, tmp_path, corpus: Corpus) -> None:
        records = corpus.records()[:20]
        c = QdrantClient(path=str(tmp_path))
        QdrantConnector(c).create_collection("persist", dense_dim=corpus.dim)
        QdrantConnector(c).upsert("persist", records)
        c.close()
        c = QdrantClient(path=str(tmp_path))
        try:
            q = FirstStageQuery("q", "dense", dense=records[7].dense)
            top = QdrantConnector(c).first_stage("persist", q, limit=3)
            assert top[0].id == records[7].id
            assert c.count("persist", exact=True).count == 20
        finally:
            c.close()


class TestQdrantServer(QdrantContract):
    """A real Qdrant server, when QDRANT_URL names one (QDRANT_API_KEY if it needs a key)."""

    @pytest.fixture(scope="class")
    def client(self) -> Iterator[QdrantClient]:
        url = os.environ.get("QDRANT_URL")
        if not url:
            pytest.skip("QDRANT_URL not set: no Qdrant server to test against")
        c = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), timeout=30)
        yield c
        c.close()


def test_point_ids_are_deterministic_uuids() -> None:
    a = point_id("scifact:123")
    assert a == point_id("scifact:123") != point_id("scifact:124")
    assert uuid.UUID(a).version == 5
    assert np.unique([point_id(str(i)) for i in range(1000)]).size == 1000
