"""Shared helpers for the load, fault and fuzz tests: real sidecars and what to check them by.

Everything runs on 127.0.0.1. Sidecars serve the bundled SPLADE-tiny backbone as a
cross-encoder (TinyBERT-L2 shape, real weights) on torch with 64-token pairs, so thousands
of calls fit in a test run on a small machine. Requests are small documents from the
bundled 48-document sample corpus; references are single calls made before any load, so
"every response matches its request" is a claim about pooled batching that can be false.

Every loop here is bounded by a count and by a `WallClock`; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rerankd.client import RerankClient
from rerankd.sample import sample_documents, sample_queries
from rerankd.server.process import SidecarProcess, spawn_sidecar
from rerankd.types import RerankResponse, SearchResult

if TYPE_CHECKING:
    from rerankd.connectors.qdrant import QdrantConnector

MODEL = "bundled:splade-tiny"
MODEL_NAME = "splade-tiny"
#: The fast real model: TinyBERT-L2 shape, real weights, 64-token pairs.
FAST_ARGS: tuple[str, ...] = (
    "--model",
    MODEL,
    "--backend",
    "torch",
    "--max-length",
    "64",
    "--log-level",
    "WARNING",
)
#: Serve no encoders: for sidecars that only rerank (starts faster, less memory).
NO_ENCODERS: tuple[str, ...] = ("--dense-encoder", "", "--sparse-encoder", "")
#: Scores of the same pair computed alone and inside a pooled, padded batch differ by
#: float rounding only; anything beyond this is a mis-routed score.
SCORE_TOL = 1e-4
COLLECTION = "sample"


def free_port() -> int:
    """A port nobody listens on right now (for a sidecar that must restart on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(*extra: str) -> list[str]:
    """`FAST_ARGS` plus `extra` (later flags win)."""
    return [*FAST_ARGS, *extra]


@contextlib.contextmanager
def running_sidecar(
    args: Sequence[str],
    *,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
) -> Iterator[SidecarProcess]:
    """A sidecar for the block; stopped (SIGTERM, then SIGKILL) however the block ends."""
    proc = spawn_sidecar(args, port=port, env=env, timeout=timeout)
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop(timeout=30)


# --------------------------------------------------------------------------- wall clock


class WallClock:
    """A hard wall-clock cap: loops consult it and the test fails instead of hanging."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> None:
        if self.expired():
            pytest.fail(f"{self.what}: wall-clock cap of {self.seconds:.0f}s exceeded")


def run_threads(
    targets: Sequence[Callable[[], None]], clock: WallClock, name: str = "worker"
) -> list[BaseException]:
    """Run each target in a daemon thread; join within `clock`; return what they raised.

    A thread still alive when the clock runs out fails the test (a hang), rather than
    blocking it: the threads are daemons, so the process can still exit.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # collected and re-raised in the test thread
                with lock:
                    errors.append(exc)

        return run

    threads = [
        threading.Thread(target=wrap(fn), name=f"{name}-{i}", daemon=True)
        for i, fn in enumerate(targets)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=clock.remaining())
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        pytest.fail(
            f"{clock.what}: {len(alive)} thread(s) still running after the "
            f"{clock.seconds:.0f}s cap (hung calls?): {alive[:5]}"
        )
    return errors


# --------------------------------------------------------------------------- /metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(sidecar: SidecarProcess, token: str | None = None, timeout: float = 10.0) -> Samples:
    """Every sample of the sidecar's /metrics, keyed by (name, sorted labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200, (resp.status, text[:200])
    finally:
        conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_by_code(samples: Samples, transport: str, method: str) -> dict[str, float]:
    """`rerankd_requests_total{transport, method}` by status code."""
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name == "rerankd_requests_total" and (d["transport"], d["method"]) == (
            transport,
            method,
        ):
            out[d["code"]] = value
    return out


def count_delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Per-code increase between two `requests_by_code` readings; zero rows dropped."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in delta.items() if v}


def queued_pairs(samples: Samples, model: str = MODEL_NAME) -> float:
    return samples[("rerankd_queued_pairs", (("model", model),))]


class MetricsSampler:
    """Scrapes /metrics every `interval` seconds in a thread while a load runs.

    Keeps the largest `rerankd_queued_pairs` seen and the `rerank` request counts of every
    scrape, so a test can show what an operator's dashboard showed during the run.
    """

    def __init__(self, sidecar: SidecarProcess, interval: float = 0.1) -> None:
        self.sidecar = sidecar
        self.interval = interval
        self.max_queued = 0.0
        self.rerank_ok: list[float] = []
        self.scrapes = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = scrape(self.sidecar, timeout=5)
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.scrapes += 1
            self.max_queued = max(self.max_queued, queued_pairs(s))
            self.rerank_ok.append(requests_by_code(s, "grpc", "rerank").get("OK", 0.0))
            self._stop.wait(self.interval)  # pacing between scrapes, not synchronisation

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the /metrics sampler hung"


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RerankCase:
    """One distinct rerank request: a query and (id, text) documents."""

    query: str
    docs: tuple[tuple[str, str], ...]
    top_n: int = 0


@dataclass(frozen=True)
class Expected:
    """A single-call reference: the score of every document index, and its ranking."""

    scores: tuple[float, ...]  # by request index
    order: tuple[int, ...]  # indices best first (ties broken as the server did)


EXTRA_QUERIES = (
    "antibodies and immune memory",
    "sourdough starter and yeast",
    "cross-encoder relevance scoring",
    "fusing result lists with reciprocal rank",
    "fever and infection",
    "baking temperature for bread",
    "vector database first stage retrieval",
)


def sample_cases(n: int, *, min_docs: int = 3, max_docs: int = 8) -> list[RerankCase]:
    """`n` distinct small requests over the sample corpus, deterministic.

    Document windows of varying size slide over the corpus (crossing topics), queries cycle
    through the bundled sample queries and a few more; every third case asks for a top_n.
    """
    docs = [(d.id, d.text) for d in sample_documents()]
    queries = [*sample_queries(), *EXTRA_QUERIES]
    span = max_docs - min_docs + 1
    cases = []
    for i in range(n):
        size = min_docs + i % span
        start = (i * 7) % len(docs)
        window = tuple(docs[(start + j * 5) % len(docs)] for j in range(size))
        top_n = (1 + i % size) if i % 3 == 0 else 0
        cases.append(RerankCase(queries[i % len(queries)], window, top_n))
    assert len(set(cases)) == n
    return cases


def reference(client: RerankClient, case: RerankCase) -> Expected:
    """The case's scores from one call on an idle sidecar (top_n=0: every document)."""
    resp = client.rerank(case.query, list(case.docs))
    scores = [math.nan] * len(case.docs)
    for r in resp.results:
        scores[r.index] = r.score
    assert not any(math.isnan(s) for s in scores)
    return Expected(tuple(scores), tuple(r.index for r in resp.results))


def check_rerank(resp: RerankResponse, case: RerankCase, exp: Expected) -> None:
    """Assert `resp` answers `case`: ids, indices, scores and order match the reference."""
    want = case.top_n or len(case.docs)
    assert len(resp.results) == want, (len(resp.results), want)
    indices = [r.index for r in resp.results]
    assert len(set(indices)) == len(indices), indices
    for r in resp.results:
        assert 0 <= r.index < len(case.docs), r.index
        assert r.id == case.docs[r.index][0], (r.id, case.docs[r.index][0])
        assert abs(r.score - exp.scores[r.index]) <= SCORE_TOL, (r.score, exp.scores[r.index])
    got = [r.score for r in resp.results]
    assert all(a >= b for a, b in itertools.pairwise(got)), got
    # The same ranking as the reference, up to swaps of ties within the tolerance.
    ref_rank = {i: k for k, i in enumerate(exp.order)}
    for a, b in itertools.pairwise(indices):
        if ref_rank[a] > ref_rank[b]:
            assert abs(exp.scores[a] - exp.scores[b]) <= SCORE_TOL, (a, b, exp.scores)
    if case.top_n:  # the best top_n, up to ties at the cut
        cut = exp.scores[exp.order[want - 1]]
        assert min(exp.scores[i] for i in indices) >= cut - SCORE_TOL


@dataclass(frozen=True)
class HitsRef:
    """A hybrid_search reference: hit ids best first and their scores."""

    ids: tuple[str, ...]
    scores: tuple[float, ...]


def hits_ref(result: SearchResult) -> HitsRef:
    return HitsRef(tuple(h.id for h in result.hits), tuple(h.score for h in result.hits))


def check_hits(result: SearchResult, ref: HitsRef) -> None:
    """Assert a reranked search returned the reference's hits with the same scores."""
    assert result.reranked, result.reason
    by_id = dict(zip(ref.ids, ref.scores, strict=True))
    assert len(result.hits) == len(ref.ids)
    for h in result.hits:
        assert h.id in by_id, (h.id, ref.ids)
        assert abs(h.score - by_id[h.id]) <= SCORE_TOL, (h.id, h.score, by_id[h.id])
    got = [h.score for h in result.hits]
    assert all(a >= b for a, b in itertools.pairwise(got)), got


# --------------------------------------------------------------------------- Qdrant


def sample_qdrant(client: RerankClient) -> QdrantConnector:
    """The 48 sample documents in an in-memory Qdrant, embedded by the sidecar."""
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    from rerankd.connectors.qdrant import QdrantConnector
    from rerankd.indexing import index_documents

    conn = QdrantConnector(QdrantClient(":memory:"))
    n = index_documents(conn, COLLECTION, sample_documents(), client=client, progress=False)
    assert n == 48
    return conn


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment (e.g. RERANKD_LOAD_CALLS), else `default`."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


# --------------------------------------------------------------------------- HTTP


def http_call(
    sidecar: SidecarProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request on a fresh connection: (status, raw body, lower-cased headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def response_from_http(payload: Mapping[str, object]) -> RerankResponse:
    """An HTTP rerank answer as the client's `RerankResponse` (for `check_rerank`)."""
    from rerankd.types import RerankResult

    results = [
        RerankResult(int(r["index"]), str(r.get("id", "")), float(r["relevance_score"]))
        for r in payload["results"]  # type: ignore[union-attr]
    ]
    return RerankResponse(results=results, model=str(payload["model"]))
