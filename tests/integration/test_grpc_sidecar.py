"""The full gRPC path against a real `rerankd serve` process on 127.0.0.1.

A plain generated stub (what a non-Python service would write from the .proto) reranks
100 DL19 candidates; health, reflection, bad input, deadlines, backpressure, round-robin,
the asyncio client and graceful shutdown are all exercised on the real server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rerankd import AsyncRerankClient, RerankClient
from rerankd.client import error_from
from rerankd.engine.factory import load_reranker
from rerankd.errors import ERROR_TYPE_KEY, InvalidInputError, UnknownModelError
from rerankd.server.process import spawn_sidecar
from rerankd.types import Document
from rerankd.v1 import reranker_pb2 as pb
from rerankd.v1 import reranker_pb2_grpc as pb_grpc

MODEL = "bundled:all-minilm-l6-v2"
SERVE_ARGS = [
    "--model",
    MODEL,
    "--max-length",
    "256",
    "--max-documents",
    "200",
    "--dense-encoder",
    "",
    "--sparse-encoder",
    "",
    "--log-level",
    "WARNING",
]
# The main sidecar also serves the bundled dense and sparse encoders behind Embed.
WITH_ENCODERS = [*SERVE_ARGS[:6], "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def sidecar():
    proc = spawn_sidecar(WITH_ENCODERS)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(sidecar):
    with grpc.insecure_channel(sidecar.address) as channel:
        yield pb_grpc.RerankerStub(channel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_reports_serving(sidecar) -> None:
    with grpc.insecure_channel(sidecar.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "rerankd.v1.Reranker"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(sidecar) -> None:
    with grpc.insecure_channel(sidecar.address) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"rerankd.v1.Reranker", "grpc.health.v1.Health"} <= names


def test_plain_stub_reranks_100_dl19_candidates(stub, dl19) -> None:
    query, cands = dl19[0]
    req = pb.RerankRequest(
        query=query,
        documents=[pb.Document(id=i, text=t) for i, t in cands],
        options=pb.RerankOptions(return_documents=True),
    )
    resp = stub.Rerank(req, timeout=60)
    assert len(resp.results) == 100
    scores = [r.score for r in resp.results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r.index for r in resp.results) == list(range(100))
    for r in resp.results:
        assert (r.id, r.text) == cands[r.index]
    assert resp.usage.tokens > 100 * 10
    assert resp.timings.inference_us > 0 and resp.model == "all-minilm-l6-v2"
    # The gRPC path adds nothing: the in-process engine, same weights, backend and batching,
    # gives the same scores. (Parity with sentence-transformers per backend, int8
    # included, is tested in test_onnx_backend.py and test_parity_torch.py.)
    ref_model = load_reranker(MODEL, default_max_length=256)
    try:
        ref = ref_model.rerank(query, [Document(i, t) for i, t in cands]).results
    finally:
        ref_model.close()
    served = np.array([r.score for r in sorted(resp.results, key=lambda r: r.index)])
    local = np.array([r.score for r in sorted(ref, key=lambda r: r.index)])
    np.testing.assert_allclose(served, local, atol=1e-5)


def test_top_n_and_list_models(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        resp = client.rerank("q about cats", ["cats", "dogs", "cars", "cats and dogs"], top_n=2)
        assert len(resp.results) == 2
        info, dense, sparse = client.list_models()
        assert (info.kind, info.num_layers, info.hidden_size) == ("reranker", 6, 384)
        assert info.is_default and info.default_max_length == 256 and info.max_length == 512
        assert (dense.kind, dense.dimension) == ("dense", 384)
        assert (sparse.kind, sparse.dimension) == ("sparse", 30522)
        # a bundled model says nothing about long documents: every window is read
        assert (info.default_long_docs, dense.default_long_docs) == ("max", "")


def test_embed_dense_and_sparse_match_in_process_encoders(sidecar) -> None:
    from rerankd.engine.encoders import load_dense_encoder, load_sparse_encoder

    texts = ["what is the capital of france", "cross-encoders rerank candidates"]
    with RerankClient(sidecar.address) as client:
        emb = client.embed(texts, dense=True, sparse=True)
        only_sparse = client.embed(texts[:1], dense=False, sparse=True)
    assert emb.dense.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb.dense, axis=1), 1.0, atol=1e-5)
    ref = load_dense_encoder("bundled:all-minilm-l6-v2").encode(texts)
    np.testing.assert_allclose(emb.dense, ref, atol=1e-5)
    ref_sparse = load_sparse_encoder("bundled:splade-tiny").encode(texts[:1])[0]
    assert emb.sparse[0].indices == ref_sparse.indices
    np.testing.assert_allclose(emb.sparse[0].values, ref_sparse.values, atol=1e-5)
    assert only_sparse.dense is None and only_sparse.sparse[0].indices == ref_sparse.indices


def test_embed_bad_input(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        with pytest.raises(InvalidInputError, match="texts is empty"):
            client.embed([])
        with pytest.raises(UnknownModelError, match="unknown dense encoder"):
            client.embed(["x"], dense_model="nope")


def _raw_call(address: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/rerankd.v1.Reranker/Rerank")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    return info.value


BAD_REQUESTS = {
    "empty query": (
        pb.RerankRequest(query="", documents=[pb.Document(text="x")]),
        "query is empty",
    ),
    "no documents": (pb.RerankRequest(query="q"), "no documents"),
    "too many documents": (
        pb.RerankRequest(query="q", documents=[pb.Document(text="x")] * 201),
        "limit is 200",
    ),
    "unknown model": (
        pb.RerankRequest(query="q", documents=[pb.Document(text="x")], model="nope"),
        "unknown model 'nope'",
    ),
    "unknown normalization": (
        pb.RerankRequest(
            query="q", documents=[pb.Document(text="x")], options=pb.RerankOptions(normalization=42)
        ),
        "unknown normalization",
    ),
    "max_length too big": (
        pb.RerankRequest(
            query="q",
            documents=[pb.Document(text="x")],
            options=pb.RerankOptions(max_length=100_000),
        ),
        "exceeds the model's limit",
    ),
    "max_length too small": (
        pb.RerankRequest(
            query="q", documents=[pb.Document(text="x")], options=pb.RerankOptions(max_length=2)
        ),
        "too small",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(sidecar, stub, case) -> None:
    req, message = BAD_REQUESTS[case]
    err = _raw_call(sidecar.address, req.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    # one status code, two kinds: the trailing metadata says which, as HTTP's error.type
    unknown_model = case == "unknown model"
    kind = "model_not_found" if unknown_model else "invalid_request"
    assert (ERROR_TYPE_KEY, kind) in tuple(err.trailing_metadata())
    mapped = error_from(err)
    assert isinstance(mapped, InvalidInputError)
    assert isinstance(mapped, UnknownModelError) == unknown_model
    ok = stub.Rerank(pb.RerankRequest(query="q", documents=[pb.Document(text="a")]), timeout=10)
    assert len(ok.results) == 1


def test_text_that_is_not_utf8_is_invalid_argument(sidecar, stub) -> None:
    # field 1 (query), length-delimited, 2 bytes that are not UTF-8
    payload = (
        b"\x0a\x02\xff\xfe"
        + pb.RerankRequest(documents=[pb.Document(text="x")]).SerializeToString()
    )
    err = _raw_call(sidecar.address, payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.details()
    garbage = _raw_call(sidecar.address, b"\xff\xff\xff\xff")
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        len(
            stub.Rerank(
                pb.RerankRequest(query="q", documents=[pb.Document(text="a")]), timeout=10
            ).results
        )
        == 1
    )


def test_python_client_maps_errors(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        with pytest.raises(UnknownModelError, match="nope"):
            client.rerank("q", ["x"], model="nope")
        with pytest.raises(InvalidInputError, match="query is empty"):
            client.rerank("", ["x"])


def test_deadline_is_enforced(sidecar, dl19) -> None:
    query, cands = dl19[1]
    with RerankClient(sidecar.address) as client, pytest.raises(TimeoutError):
        client.rerank(query, [t for _, t in cands], timeout=0.001)


def test_round_robin_survives_a_dead_address(sidecar) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with RerankClient([dead, sidecar.address], retries=3, timeout=10) as client:
        for _ in range(6):  # every other pick lands on the dead one first
            assert len(client.rerank("q", ["a", "b"]).results) == 2


def test_closing_right_after_a_failover_leaves_no_thread_that_raises(sidecar) -> None:
    """A client closed straight after a call that failed over leaves nothing behind that
    raises later. (Waiting on grpc.channel_ready_future between retries did: its polling
    thread outlives the wait and raised "Channel closed" once the client was closed.)"""
    dead = f"127.0.0.1:{free_port()}"
    before = set(threading.enumerate())
    raised: list[threading.ExceptHookArgs] = []
    previous, threading.excepthook = threading.excepthook, raised.append
    try:
        for _ in range(3):
            with RerankClient([dead, sidecar.address], retries=3, timeout=10) as client:
                for _ in range(6):  # every other pick lands on the dead one first
                    assert len(client.rerank("q", ["a", "b"]).results) == 2
        left = set(threading.enumerate()) - before
        for thread in left:
            thread.join(timeout=5)
    finally:
        threading.excepthook = previous
    assert not [t for t in left if t.is_alive()]
    assert not raised, [f"{r.thread}: {r.exc_value!r}" for r in raised]


def test_async_client(sidecar) -> None:
    async def run() -> list[int]:
        async with AsyncRerankClient(sidecar.address) as client:
            resps = await asyncio.gather(
                *(client.rerank(f"query {i}", [f"doc {j}" for j in range(i + 1)]) for i in range(8))
            )
            return [len(r.results) for r in resps]

    assert asyncio.run(run()) == list(range(1, 9))


def test_async_round_robin_survives_a_dead_address(sidecar) -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def run() -> list[int]:
        async with AsyncRerankClient([dead, sidecar.address], retries=3, timeout=10) as client:
            # sequential, so every other call picks the dead address first and fails over
            return [len((await client.rerank("q", ["a", "b"])).results) for _ in range(6)]

    assert asyncio.run(run()) == [2] * 6


def test_concurrent_callers_get_their_own_results(dl19) -> None:
    """Pooled batching must route every score to its request: compare with single calls.

    On torch fp32, whose scores do not depend on batch neighbours (int8 activations are
    quantised per batch, so its scores shift slightly with the company a pair keeps).
    """
    proc = spawn_sidecar([*SERVE_ARGS, "--backend", "torch"])
    requests = [(q, [t for _, t in c[:30]]) for q, c in dl19[:4]]
    try:
        with RerankClient(proc.address, timeout=120) as client:
            single = [client.rerank(q, docs) for q, docs in requests]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                pooled = list(pool.map(lambda qd: client.rerank(*qd), requests * 4))
    finally:
        proc.stop()
    for i, resp in enumerate(pooled):
        ref = single[i % len(requests)]
        by_index = {r.index: r.score for r in ref.results}
        np.testing.assert_allclose(
            [r.score for r in resp.results], [by_index[r.index] for r in resp.results], atol=1e-5
        )


def test_full_queue_answers_resource_exhausted(dl19) -> None:
    proc = spawn_sidecar([*SERVE_ARGS, "--max-queued-pairs", "100"])
    try:
        query, cands = dl19[2]
        docs = [t for _, t in cands]
        codes = []
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.RerankerStub(ch)
            req = pb.RerankRequest(query=query, documents=[pb.Document(text=t) for t in docs])
            futures = [stub.Rerank.future(req, timeout=120) for _ in range(6)]
            for f in futures:
                try:
                    f.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    assert "queue is full" in exc.details()
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    finally:
        proc.stop()


def test_depth_and_long_documents_over_grpc(sidecar) -> None:
    long_doc = " ".join(["the cat sat on the mat and looked at the dog"] * 600)  # ~7,000 tokens
    with RerankClient(sidecar.address, timeout=120) as client:
        full = client.rerank("cats", ["a cat", long_doc])
        shallow = client.rerank("cats", ["a cat", long_doc], depth=2)
        assert (full.depth, shallow.depth) == (6, 2)
        assert {r.index: r.score for r in full.results} != {
            r.index: r.score for r in shallow.results
        }
        assert full.tokens > 4000  # the long document was read in windows, up to the 4,096 cap
        truncated = client.rerank("cats", ["a cat", long_doc], long_docs="truncate")
        assert truncated.tokens < 600
        with pytest.raises(InvalidInputError, match="depth 7 is outside"):
            client.rerank("cats", ["a cat"], depth=7)


def test_token_pruning_over_grpc_reports_the_schedule(sidecar) -> None:
    with RerankClient(sidecar.address, timeout=60) as client:
        info = client.list_models()[0]
        assert info.supports_depth
        docs = ["a cat sat on the mat in the sun", "dogs bark"]
        if not info.supports_token_pruning:  # the ONNX backend does not prune tokens
            with pytest.raises(InvalidInputError, match="does not prune tokens"):
                client.rerank("cats", docs, keep_ratio=0.5, keep_from_layer=3)
            return
        resp = client.rerank("cats", docs, keep_ratio=0.5, keep_from_layer=3)
        assert resp.keep_schedule == (1.0, 1.0, 0.5, 0.5, 0.5, 0.5)
