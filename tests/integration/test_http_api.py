"""The HTTP API against a real `rerankd serve` process, side by side with its gRPC API.

One sidecar serves both transports. Curl-style JSON calls (plain `http.client`, no SDK)
must rank exactly as the gRPC client does, embeddings must match gRPC Embed, probes must
answer, /metrics must count exactly the calls made, and bad input must get a 4xx that
names what to fix while the server keeps answering correctly. The vendors' own SDKs
(Cohere's v1 and v2 clients, OpenAI's) pointed at the sidecar must get the same answers.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
from collections.abc import Iterator
from typing import Any

import cohere
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rerankd import RerankClient
from rerankd.sample import sample_documents, sample_queries
from rerankd.server.process import SidecarProcess, spawn_sidecar

ARGS = [
    "--model",
    "bundled:splade-tiny",
    "--backend",
    "torch",
    "--max-length",
    "128",
    "--log-level",
    "WARNING",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProcess]:
    proc = spawn_sidecar(ARGS, http_port=0)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def grpc_client(sidecar: SidecarProcess) -> Iterator[RerankClient]:
    with RerankClient(sidecar.address, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [d.text for d in sample_documents()][:24]


def call(
    sidecar: SidecarProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request, as curl would send it; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=30)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})} if data else {}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        is_json = resp.getheader("content-type", "").startswith("application/json")
        return resp.status, json.loads(text) if is_json else text
    finally:
        conn.close()


def request_counts(sidecar: SidecarProcess) -> dict[tuple[str, str, str], float]:
    status, text = call(sidecar, "GET", "/metrics")
    assert status == 200
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rerankd_requests_total":
                out[(s.labels["transport"], s.labels["method"], s.labels["code"])] = s.value
    return out


def test_health_and_ready(sidecar: SidecarProcess) -> None:
    assert call(sidecar, "GET", "/health") == (200, {"status": "ok"})
    status, body = call(sidecar, "GET", "/ready")
    assert status == 200 and body["status"] == "ready"
    assert body["models"] == ["splade-tiny"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_http_and_grpc_return_the_same_ranking(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str], path: str
) -> None:
    for query in sample_queries()[:3]:
        expected = grpc_client.rerank(query, corpus)
        status, body = call(sidecar, "POST", path, {"query": query, "documents": corpus})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == [r.index for r in expected.results]
        for got, want in zip(body["results"], expected.results, strict=True):
            assert math.isclose(got["relevance_score"], want.score, rel_tol=TOL, abs_tol=TOL)
        assert body["model"] == expected.model == "splade-tiny"
        assert body["usage"]["total_tokens"] == expected.tokens > 0
        assert body["id"]


def test_top_n_ids_documents_and_sigmoid_match_grpc(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    query = sample_queries()[0]
    docs = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(corpus)]
    expected = grpc_client.rerank(
        query, [(d["id"], d["text"]) for d in docs], top_n=5, normalization="sigmoid"
    )
    status, body = call(
        sidecar,
        "POST",
        "/v1/rerank",
        {
            "query": query,
            "documents": docs,
            "top_n": 5,
            "normalize": "sigmoid",
            "return_documents": True,
        },
    )
    assert status == 200, body
    assert len(body["results"]) == 5
    for got, want in zip(body["results"], expected.results, strict=True):
        assert (got["index"], got["id"]) == (want.index, want.id)
        assert got["document"] == {"text": corpus[want.index]}
        assert 0.0 < got["relevance_score"] < 1.0
        assert math.isclose(got["relevance_score"], want.score, rel_tol=TOL, abs_tol=TOL)


def test_embeddings_match_grpc_embed(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    texts = corpus[:5]
    expected = grpc_client.embed(texts)
    status, body = call(sidecar, "POST", "/v1/embeddings", {"input": texts})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == expected.dense_model
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected.dense, atol=TOL)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    # One string in, one embedding out; base64 is what the OpenAI SDK requests by default.
    status, one = call(
        sidecar, "POST", "/embeddings", {"input": texts[0], "encoding_format": "base64"}
    )
    assert status == 200 and len(one["data"]) == 1
    vec = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, expected.dense[0], atol=TOL)


def test_sparse_embeddings_extension_matches_grpc(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    texts = corpus[:3]
    expected = grpc_client.embed(texts, dense=False, sparse=True)
    status, body = call(sidecar, "POST", "/v1/embeddings", {"input": texts, "sparse": True})
    assert status == 200, body
    assert expected.sparse is not None
    for item, want in zip(body["data"], expected.sparse, strict=True):
        assert "embedding" not in item  # sparse only, as gRPC Embed with sparse=True
        assert item["sparse_embedding"]["indices"] == want.indices
        np.testing.assert_allclose(item["sparse_embedding"]["values"], want.values, atol=TOL)


def test_models_lists_what_is_loaded(sidecar: SidecarProcess) -> None:
    status, body = call(sidecar, "GET", "/v1/models")
    assert status == 200
    kinds = {(m["id"], m["kind"]) for m in body["data"]}
    assert ("splade-tiny", "reranker") in kinds
    assert {k for _, k in kinds} == {"reranker", "dense_encoder", "sparse_encoder"}


BAD_INPUTS = [
    # (body or raw bytes, status, error type, words the message must contain)
    ({"query": "", "documents": ["a"]}, 400, "invalid_request", "query is empty"),
    ({"query": "q", "documents": []}, 400, "invalid_request", "no documents"),
    ({"query": "q", "documents": ["a"], "model": "nope"}, 404, "model_not_found", "'nope'"),
    ({"query": "q", "documents": ["a"], "top_n": -1}, 400, "invalid_request", "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": "3"}, 422, "invalid_request", "top_n"),
    ({"query": ["q"], "documents": ["a"]}, 422, "invalid_request", "query"),
    ({"query": "q", "documents": [{"id": "1"}]}, 422, "invalid_request", "documents[0].text"),
    ({"query": "q", "documents": [3]}, 422, "invalid_request", "documents[0]"),
    ({"documents": ["a"]}, 422, "invalid_request", "query: Field required"),
    ({"query": "q", "documents": ["a"], "max_length": 4}, 400, "invalid_request", "max_length"),
    (b'{"query": "q", "documents": [', 400, "invalid_json", "not valid JSON"),
    (b"", 422, "invalid_request", "request body is missing"),
]


@pytest.mark.parametrize(("body", "status", "type_", "words"), BAD_INPUTS)
def test_bad_rerank_input_is_a_4xx_that_says_what_to_fix(
    sidecar: SidecarProcess, body: Any, status: int, type_: str, words: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer = call(sidecar, "POST", "/v1/rerank", None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert answer["error"]["type"] == type_
    assert words in answer["error"]["message"]


def test_bad_embeddings_input_and_unknown_routes(sidecar: SidecarProcess) -> None:
    status, body = call(sidecar, "POST", "/v1/embeddings", {"input": [1, 2]})
    assert status == 422 and "input[0]" in body["error"]["message"]
    status, body = call(sidecar, "POST", "/v1/embeddings", {"input": []})
    assert status == 400 and "texts is empty" in body["error"]["message"]
    status, body = call(sidecar, "POST", "/v1/embeddings", {"input": "a", "dimensions": 7})
    assert status == 400 and "384" in body["error"]["message"]
    status, body = call(sidecar, "GET", "/v2/nothing")
    assert status == 404 and body["error"]["type"] == "not_found"


def test_body_over_the_cap_is_413(sidecar: SidecarProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/rerank")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str((32 << 20) + 1))  # the default --max-message-bytes
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "--max-message-bytes" in json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()


def test_server_still_ranks_correctly_after_bad_input(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    call(sidecar, "POST", "/v1/rerank", raw=b"{{{{")
    call(sidecar, "POST", "/v1/rerank", {"query": "", "documents": []})
    query = sample_queries()[1]
    status, body = call(sidecar, "POST", "/v1/rerank", {"query": query, "documents": corpus})
    assert status == 200
    expected = grpc_client.rerank(query, corpus)
    assert [r["index"] for r in body["results"]] == [r.index for r in expected.results]


def test_metrics_count_exactly_the_calls_made(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    before = request_counts(sidecar)
    ok = {"query": "bread", "documents": corpus[:4]}
    for _ in range(3):
        assert call(sidecar, "POST", "/v1/rerank", ok)[0] == 200
    assert call(sidecar, "POST", "/rerank", ok)[0] == 200
    assert call(sidecar, "POST", "/v2/rerank", ok)[0] == 200
    assert call(sidecar, "POST", "/v1/rerank", {"query": "", "documents": ["a"]})[0] == 400
    assert call(sidecar, "POST", "/v1/rerank", {"query": 1})[0] == 422
    for _ in range(2):
        assert call(sidecar, "POST", "/v1/embeddings", {"input": "x"})[0] == 200
    grpc_client.rerank("bread", corpus[:4])
    call(sidecar, "GET", "/health")  # probes are not counted as API calls
    after = request_counts(sidecar)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert {k: v for k, v in delta.items() if v} == {
        ("http", "rerank", "200"): 5.0,
        ("http", "rerank", "400"): 1.0,
        ("http", "rerank", "422"): 1.0,
        ("http", "embed", "200"): 2.0,
        ("grpc", "rerank", "OK"): 1.0,
    }


def test_metrics_expose_queue_batches_tokens_and_cache(sidecar: SidecarProcess) -> None:
    call(sidecar, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    status, text = call(sidecar, "GET", "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    model = (("model", "splade-tiny"),)
    assert samples[("rerankd_queued_pairs", model)] == 0.0
    assert samples[("rerankd_batch_size_count", model)] >= 1.0
    assert samples[("rerankd_tokens_total", (("method", "rerank"), *model))] > 0
    assert samples[("rerankd_cache_hits_total", ())] == 0.0
    assert samples[("rerankd_ready", ())] == 1.0
    assert any(name == "rerankd_request_duration_seconds_bucket" for name, _ in samples)


# --------------------------------------------------------------------------- vendor SDKs


def _base_url(sidecar: SidecarProcess) -> str:
    return f"http://127.0.0.1:{sidecar.http_port}"


def _reranker_id(sidecar: SidecarProcess) -> str:
    status, body = call(sidecar, "GET", "/v1/models")
    assert status == 200
    return next(m["id"] for m in body["data"] if m["kind"] == "reranker" and m["is_default"])


def test_cohere_sdk_v1_and_v2_rank_as_grpc_does(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    docs = corpus[:12]
    expected = grpc_client.rerank("bread and butter", docs)
    want = [(r.index, r.score) for r in expected.results]
    model = _reranker_id(sidecar)
    v1 = cohere.Client(api_key="unused", base_url=_base_url(sidecar)).rerank(
        query="bread and butter", documents=docs, model=model, return_documents=True
    )
    v2 = cohere.ClientV2(api_key="unused", base_url=_base_url(sidecar)).rerank(
        model=model, query="bread and butter", documents=docs, top_n=3
    )
    for got, n in ((v1, len(docs)), (v2, 3)):
        assert [r.index for r in got.results] == [i for i, _ in want[:n]]
        np.testing.assert_allclose(
            [r.relevance_score for r in got.results], [s for _, s in want[:n]], atol=TOL
        )
    assert [r.document.text for r in v1.results] == [docs[i] for i, _ in want]


def test_cohere_v2_max_tokens_per_doc_is_max_doc_tokens(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    docs = corpus[:6]
    co = cohere.ClientV2(api_key="unused", base_url=_base_url(sidecar))
    model = _reranker_id(sidecar)
    cut = co.rerank(model=model, query="bread", documents=docs, max_tokens_per_doc=6)
    expected = {
        r.index: r.score for r in grpc_client.rerank("bread", docs, max_doc_tokens=6).results
    }
    full = {r.index: r.score for r in grpc_client.rerank("bread", docs).results}
    got = {r.index: r.relevance_score for r in cut.results}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose(
        [got[i] for i in sorted(got)], [expected[i] for i in sorted(got)], atol=TOL
    )
    assert max(abs(got[i] - full[i]) for i in got) > 1e-3  # the cap did cut the documents
    with pytest.raises(
        cohere.core.api_error.ApiError, match="max_tokens_per_doc must be >= 1"
    ) as err:
        co.rerank(model=model, query="bread", documents=docs, max_tokens_per_doc=0)
    assert err.value.status_code == 400
    with pytest.raises(cohere.core.api_error.ApiError, match="no-such-model") as err:
        co.rerank(model="no-such-model", query="bread", documents=docs)
    assert err.value.status_code == 404


def test_openai_sdk_embeddings_match_grpc_embed(
    sidecar: SidecarProcess, grpc_client: RerankClient, corpus: list[str]
) -> None:
    texts = corpus[:5]
    expected = np.asarray(grpc_client.embed(texts).dense)
    client = openai.OpenAI(api_key="unused", base_url=_base_url(sidecar) + "/v1")
    for encoding in (openai.NOT_GIVEN, "float"):  # the SDK asks for base64 unless told
        resp = client.embeddings.create(input=texts, model="", encoding_format=encoding)
        assert [d.index for d in resp.data] == list(range(len(texts)))
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=TOL)
    listed = {(m.id, m.kind) for m in client.models.list()}
    assert (_reranker_id(sidecar), "reranker") in listed
    assert any(kind == "dense_encoder" for _, kind in listed)
