"""hybrid_search end to end: a real sidecar process, real embedded Qdrant and Milvus Lite.

Indexing embeds the bundled sample corpus through the sidecar (dense + SPLADE); queries
run the first stage natively in the DB and rerank through gRPC. The sidecar is killed
mid-test: searches fail open; restarted on the same port: reranking resumes with the
same client object.
"""

from __future__ import annotations

import asyncio
import socket
import time
import warnings

import numpy as np
import pytest

from rerankd import AsyncRerankClient, RerankClient, ahybrid_search, hybrid_search
from rerankd.connectors.base import ConnectorError
from rerankd.errors import InvalidInputError, UnavailableError
from rerankd.indexing import index_documents
from rerankd.sample import sample_documents
from rerankd.server.process import spawn_sidecar

ARGS = ["--model", "bundled:splade-tiny", "--max-length", "128", "--log-level", "WARNING"]
QUERY = "how do vaccines protect against disease"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def sidecar(port):
    proc = spawn_sidecar(ARGS, port=port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(sidecar):
    # Few retries and a short backoff: the fault tests want fail-open answers quickly.
    with RerankClient(sidecar.address, timeout=30, retries=1, backoff=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def qdrant(client):
    from qdrant_client import QdrantClient

    from rerankd.connectors.qdrant import QdrantConnector

    conn = QdrantConnector(QdrantClient(":memory:"))
    assert index_documents(conn, "sample", sample_documents(), client=client, progress=False) == 48
    return conn


@pytest.fixture(scope="module")
def milvus(client, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from rerankd.connectors.milvus import MilvusConnector, open_milvus_lite

        conn = MilvusConnector(open_milvus_lite(tmp_path_factory.mktemp("milvus") / "m.db"))
    index_documents(conn, "sample", sample_documents(), client=client, progress=False)
    return conn


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_reranked_hits_are_the_candidates_rescored(qdrant, client, mode) -> None:
    first = hybrid_search(
        "sample",
        QUERY,
        connector=qdrant,
        client=client,
        mode=mode,
        top_k=20,
        candidates=20,
        rerank=False,
    )
    assert not first.reranked and first.reason == "rerank=False"
    assert [h.first_stage_rank for h in first.hits] == list(range(1, 21))
    res = hybrid_search(
        "sample", QUERY, connector=qdrant, client=client, mode=mode, top_k=5, candidates=20
    )
    assert res.reranked and res.reason == ""
    assert len(res.hits) == 5
    scores = [h.score for h in res.hits]
    assert scores == sorted(scores, reverse=True)
    # the reranked hits are the best of the same 20 candidates by a direct rerank call
    direct = client.rerank(QUERY, [(h.id, h.text) for h in first.hits])
    assert [h.id for h in res.hits] == [r.id for r in direct.results[:5]]
    np.testing.assert_allclose(scores, [r.score for r in direct.results[:5]], atol=1e-5)
    # candidates bounded what reranking saw
    assert all(h.first_stage_rank <= 20 for h in res.hits)
    assert res.timings.rerank_ms > 0 and res.timings.first_stage_ms > 0


def test_vaccine_query_finds_immunology_first_stage(qdrant, client) -> None:
    res = hybrid_search("sample", QUERY, connector=qdrant, client=client, top_k=3, rerank=False)
    assert res.hits[0].payload["topic"] == "immunology"


def test_filter_in_the_dbs_own_form_holds(qdrant, milvus, client) -> None:
    from qdrant_client import models

    flt = models.Filter(
        must=[models.FieldCondition(key="topic", match=models.MatchValue(value="cooking"))]
    )
    res = hybrid_search("sample", QUERY, connector=qdrant, client=client, filter=flt, top_k=12)
    assert len(res.hits) == 12 and {h.payload["topic"] for h in res.hits} == {"cooking"}
    res = hybrid_search(
        "sample", QUERY, connector=milvus, client=client, filter='topic == "cooking"', top_k=12
    )
    assert len(res.hits) == 12 and {h.payload["topic"] for h in res.hits} == {"cooking"}


def test_ready_vector_with_query_text(qdrant, client) -> None:
    vec = client.embed([QUERY]).dense[0]
    by_text = hybrid_search("sample", QUERY, connector=qdrant, client=client, mode="dense", top_k=5)
    by_vec = hybrid_search(
        "sample", vec, query_text=QUERY, connector=qdrant, client=client, mode="dense", top_k=5
    )
    assert [h.id for h in by_vec.hits] == [h.id for h in by_text.hits]
    no_text = hybrid_search("sample", vec, connector=qdrant, client=client, mode="dense", top_k=5)
    assert not no_text.reranked and "query_text" in no_text.reason
    with pytest.raises(InvalidInputError, match="needs query text"):
        hybrid_search("sample", vec, connector=qdrant, client=client, mode="hybrid")


def test_bad_arguments_and_db_errors(qdrant, client) -> None:
    with pytest.raises(InvalidInputError, match="mode"):
        hybrid_search("sample", QUERY, connector=qdrant, client=client, mode="fuzzy")
    with pytest.raises(InvalidInputError, match="top_k"):
        hybrid_search("sample", QUERY, connector=qdrant, client=client, top_k=0)
    with pytest.raises(ConnectorError, match="qdrant collection 'missing'"):
        hybrid_search("missing", QUERY, connector=qdrant, client=client)


def test_a_huge_or_malformed_stored_document_still_reranks(client) -> None:
    """Real Qdrant and sidecar: a stored text over the sidecar's --max-document-chars, and
    one with a lone surrogate, are sent cut and mended, and come back as stored."""
    from qdrant_client import QdrantClient

    from rerankd.connectors.base import IndexRecord
    from rerankd.connectors.qdrant import QdrantConnector

    conn = QdrantConnector(QdrantClient(":memory:"))
    conn.create_collection("odd", dense_dim=384)
    texts = {
        "huge": "Vaccines train the immune system. " * 4000,  # 136k characters
        "broken": "Vaccines protect \ud800 against disease.",
        "plain": "Bread rises because yeast makes gas.",
    }
    emb = client.embed(["Vaccines protect against disease."], sparse=True, input_type="document")
    conn.upsert(
        "odd",
        [IndexRecord(k, t, emb.dense[0].tolist(), emb.sparse[0]) for k, t in texts.items()],
    )
    res = hybrid_search("odd", QUERY, connector=conn, client=client, fail_open=False)
    assert res.reranked and {h.id for h in res.hits} == set(texts)
    assert {h.id: h.text for h in res.hits} == texts
    assert res.hits[-1].id == "plain"


def test_milvus_hybrid_with_native_bm25(milvus, client) -> None:
    res = hybrid_search("sample", QUERY, connector=milvus, client=client, top_k=5, candidates=20)
    assert res.reranked and len(res.hits) == 5
    first = hybrid_search("sample", QUERY, connector=milvus, client=client, top_k=5, rerank=False)
    assert first.hits[0].payload["topic"] == "immunology"


def test_async_twin(qdrant, sidecar) -> None:
    async def run():
        async with AsyncRerankClient(sidecar.address) as ac:
            return await ahybrid_search("sample", QUERY, connector=qdrant, client=ac, top_k=4)

    res = asyncio.run(run())
    assert res.reranked and len(res.hits) == 4


def test_kill_fails_open_and_restart_resumes_without_a_new_client(
    sidecar, port, qdrant, milvus, client
) -> None:
    vec = client.embed([QUERY]).dense[0]
    before = hybrid_search(
        "sample", vec, query_text=QUERY, connector=qdrant, client=client, mode="dense", top_k=5
    )
    assert before.reranked
    sidecar.kill()  # a crash, not a graceful stop
    down = hybrid_search(
        "sample",
        vec,
        query_text=QUERY,
        connector=qdrant,
        client=client,
        mode="dense",
        top_k=5,
        timeout=5,
    )
    assert not down.reranked and "Unavailable" in down.reason
    assert [h.first_stage_rank for h in down.hits] == [1, 2, 3, 4, 5]
    # text query on Milvus: embedding fails too, the first stage falls back to native BM25
    bm25 = hybrid_search("sample", QUERY, connector=milvus, client=client, top_k=5, timeout=5)
    assert not bm25.reranked and "fell back to BM25" in bm25.reason and bm25.mode == "sparse"
    assert bm25.hits[0].payload["topic"] == "immunology"
    with pytest.raises(UnavailableError):
        hybrid_search(
            "sample",
            vec,
            query_text=QUERY,
            connector=qdrant,
            client=client,
            mode="dense",
            fail_open=False,
            timeout=5,
        )
    # Qdrant's learned-sparse first stage needs the sidecar: no silent fallback
    with pytest.raises(UnavailableError):
        hybrid_search("sample", QUERY, connector=qdrant, client=client, timeout=5)

    restarted = spawn_sidecar(ARGS, port=port)
    try:
        # The channel reconnects on its own backoff schedule (at most 1 s): searches fail
        # open until it has, then rerank again. Bounded: at most 3 s of attempts.
        served_at = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            after = hybrid_search(
                "sample",
                vec,
                query_text=QUERY,
                connector=qdrant,
                client=client,
                mode="dense",
                top_k=5,
                timeout=5,
            )
            if after.reranked or time.monotonic() - served_at > 3:
                break
        assert after.reranked, after.reason
        assert time.monotonic() - served_at < 3 and attempts < 50
        assert [h.id for h in after.hits] == [h.id for h in before.hits]
    finally:
        restarted.stop()
