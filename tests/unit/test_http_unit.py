"""The HTTP layer without a server: status table, body parsing, error shapes, body cap, metrics."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from rerankd.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
    RerankdError,
    UnavailableError,
    UnknownModelError,
)
from rerankd.server.config import parse_serve_args
from rerankd.server.grpc_service import EmbedResult
from rerankd.server.http_app import (
    Edge,
    EmbeddingsBody,
    RerankBody,
    embeddings_payload,
    rerank_inputs,
    rerank_payload,
    validation_error,
)
from rerankd.server.metrics import Metrics
from rerankd.server.process import parse_ready_line
from rerankd.server.status import code_for, http_status_for
from rerankd.types import (
    Document,
    Normalization,
    RerankResponse,
    RerankResult,
    SparseVector,
    Timings,
)


@pytest.mark.parametrize(
    ("exc", "grpc_code", "http", "type_"),
    [
        (UnknownModelError("x"), grpc.StatusCode.INVALID_ARGUMENT, 404, "model_not_found"),
        (InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request"),
        (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded"),
        (DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
        (ModelLoadError("x"), grpc.StatusCode.INTERNAL, 500, "internal_error"),
        (RerankdError("x"), grpc.StatusCode.INTERNAL, 500, "internal_error"),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL, 500, "internal_error"),
    ],
)
def test_one_table_maps_errors_for_both_transports(
    exc: Exception, grpc_code: grpc.StatusCode, http: int, type_: str
) -> None:
    assert code_for(exc) == grpc_code
    assert http_status_for(exc) == (http, type_)


def test_rerank_body_accepts_strings_and_objects() -> None:
    body = RerankBody.model_validate(
        {
            "query": "q",
            "documents": ["plain", {"text": "with id", "id": "d1", "title": "ignored"}],
            "top_n": 1,
            "return_documents": True,
            "normalize": "sigmoid",
            "max_length": 64,
        }
    )
    documents, top_n, options = rerank_inputs(body)
    assert documents == [Document("", "plain"), Document("d1", "with id")]
    assert top_n == 1
    assert options.normalization is Normalization.SIGMOID
    assert options.max_length == 64 and options.return_documents
    # Omitted fields mean the server's defaults, as on gRPC.
    _, top_n, options = rerank_inputs(RerankBody.model_validate({"query": "q", "documents": []}))
    assert top_n == 0 and options.max_length == 0
    assert options.normalization is Normalization.RAW and not options.return_documents


def test_cohere_v2_max_tokens_per_doc_sets_max_doc_tokens() -> None:
    def options(**fields: Any) -> Any:
        body = RerankBody.model_validate({"query": "q", "documents": ["a"], **fields})
        return rerank_inputs(body)[2]

    assert options().max_doc_tokens == 0  # the server's default
    assert options(max_tokens_per_doc=512).max_doc_tokens == 512
    assert options(max_doc_tokens=512, max_tokens_per_doc=512).max_doc_tokens == 512
    with pytest.raises(InvalidInputError, match="max_tokens_per_doc must be >= 1, got 0"):
        options(max_tokens_per_doc=0)
    with pytest.raises(InvalidInputError, match="disagree; they are the same setting"):
        options(max_doc_tokens=256, max_tokens_per_doc=512)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"documents": ["a"]}, "query"),
        ({"query": "q"}, "documents"),
        ({"query": 5, "documents": ["a"]}, "query"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": [7]}, "documents[0]"),
        ({"query": "q", "documents": [{"id": "x"}]}, "documents[0].text"),
        ({"query": "q", "documents": ["a"], "top_n": "3"}, "top_n"),
        ({"query": "q", "documents": ["a"], "top_n": 2.0}, "top_n"),
        ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
        ({"query": "q", "documents": ["a"], "normalize": "softmax"}, "normalize"),
    ],
)
def test_rerank_body_errors_name_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        RerankBody.model_validate(payload)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    status, body = validation_error(errors)
    assert status == 422
    assert body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field}:")


def test_invalid_json_is_400_and_says_where() -> None:
    errors = [
        {
            "type": "json_invalid",
            "loc": ("body", 12),
            "msg": "JSON decode error",
            "ctx": {"error": "Expecting value"},
        }
    ]
    status, body = validation_error(errors)
    assert status == 400
    assert body["error"]["type"] == "invalid_json"
    assert "not valid JSON (Expecting value at character 12)" in body["error"]["message"]


def test_missing_body_is_explained() -> None:
    missing = {"type": "missing", "loc": ("body",), "msg": "Field required"}
    status, body = validation_error([missing])
    assert status == 422
    assert "request body is missing" in body["error"]["message"]


def test_embeddings_body_takes_one_string_or_a_list() -> None:
    assert EmbeddingsBody.model_validate({"input": "one"}).input == ["one"]
    assert EmbeddingsBody.model_validate({"input": ["a", "b"]}).input == ["a", "b"]
    for bad in ({"input": [1, 2]}, {"input": 3}, {}, {"input": "a", "encoding_format": "int8"}):
        with pytest.raises(ValidationError):
            EmbeddingsBody.model_validate(bad)


def test_rerank_payload_is_cohere_shaped_and_best_first() -> None:
    body = RerankBody.model_validate(
        {"query": "q", "documents": ["a", {"text": "b", "id": "B"}], "return_documents": True}
    )
    resp = RerankResponse(
        results=[RerankResult(1, "B", 2.5, "b"), RerankResult(0, "", -1.0, "a")],
        model="m",
        tokens=11,
        timings=Timings(1, 2, 3),
    )
    out = rerank_payload(resp, body, "rerank-1")
    assert out["results"] == [
        {"index": 1, "relevance_score": 2.5, "id": "B", "document": {"text": "b"}},
        {"index": 0, "relevance_score": -1.0, "document": {"text": "a"}},
    ]
    assert out["id"] == "rerank-1" and out["model"] == "m"
    assert out["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert out["meta"]["tokens"] == {"input_tokens": 11}
    json.dumps(out)  # plain JSON types only


def test_embeddings_payload_float_base64_and_sparse() -> None:
    dense = np.array([[0.5, -0.25], [1.0, 0.0]], dtype=np.float32)
    sparse = [SparseVector([3], [0.5]), SparseVector([1, 9], [1.0, 2.0])]
    result = EmbedResult(dense, sparse, "dense-m", "sparse-m", 7)
    out = embeddings_payload(result, EmbeddingsBody.model_validate({"input": ["a", "b"]}))
    assert out["object"] == "list" and out["model"] == "dense-m"
    assert out["data"][1] == {
        "object": "embedding",
        "index": 1,
        "embedding": [1.0, 0.0],
        "sparse_embedding": {"indices": [1, 9], "values": [1.0, 2.0]},
    }
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    b64 = embeddings_payload(
        result, EmbeddingsBody.model_validate({"input": ["a", "b"], "encoding_format": "base64"})
    )
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, dense[0])


def test_ready_line_with_and_without_http() -> None:
    assert parse_ready_line("rerankd serving on 127.0.0.1:50051 http 127.0.0.1:8080\n") == (
        "127.0.0.1",
        50051,
        8080,
    )
    assert parse_ready_line("rerankd serving on 0.0.0.0:7\n") == ("0.0.0.0", 7, None)


def test_http_port_flag_defaults_on_and_reads_env() -> None:
    assert parse_serve_args([], {}).http_port == 8080
    assert parse_serve_args([], {"RERANKD_HTTP_PORT": "-1"}).http_port == -1
    assert parse_serve_args(["--http-port", "0"], {"RERANKD_HTTP_PORT": "9"}).http_port == 0


# ----------------------------------------------------------------------------- Edge


async def _inner_echo(scope: dict, receive: Any, send: Any) -> None:
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


def _drive(edge: Edge, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[dict]:
    """Run one request through `edge`, the body arriving in `chunks`; return what it sent."""
    scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": headers}
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(edge(scope, receive, send))
    return sent


def _requests_total(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    text = metrics.render()[0].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rerankd_requests_total":
                out[(s.labels["transport"], s.labels["method"], s.labels["code"])] = s.value
    return out


def test_edge_refuses_a_body_over_the_cap_and_counts_it() -> None:
    metrics = Metrics()
    edge = Edge(_inner_echo, metrics, max_body_bytes=10)
    ok = _drive(edge, [b"12345", b"678"], [])
    assert ok[0]["status"] == 200 and ok[1]["body"] == b"12345678"
    streamed = _drive(edge, [b"123456", b"789012"], [])  # no Content-Length: counted as read
    assert streamed[0]["status"] == 413
    assert b"--max-message-bytes" in streamed[1]["body"]
    declared = _drive(edge, [b""], [(b"content-length", b"11")])  # refused before reading
    assert declared[0]["status"] == 413
    assert _requests_total(metrics) == {
        ("http", "rerank", "200"): 1.0,
        ("http", "rerank", "413"): 2.0,
    }


def test_edge_reads_post_bodies_as_json_whatever_the_content_type() -> None:
    seen: list[list] = []

    async def inner(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        await _inner_echo(scope, receive, send)

    edge = Edge(inner, Metrics(), max_body_bytes=100)
    _drive(edge, [b"{}"], [(b"content-type", b"application/x-www-form-urlencoded")])
    assert seen == [[(b"content-type", b"application/json")]]


def test_metrics_registries_are_per_sidecar() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("grpc", "rerank", "OK", 0.01)
    assert _requests_total(a) == {("grpc", "rerank", "OK"): 1.0}
    assert _requests_total(b) == {}
    text = b.render()[0].decode()
    assert "rerankd_cache_hits_total 0.0" in text
