"""Load: 64 concurrent clients against one real sidecar, rerank mixed with hybrid_search.

Each client is its own `RerankClient` (its own channel and connection) with no retries,
so every failure shows. Every 8th call of a client is a `hybrid_search` over an in-memory
Qdrant collection of the sample corpus (one in four of those embeds its query through the
sidecar's `Embed`; the others pass a ready vector), the rest are direct rerank calls
over a few dozen distinct small requests. Every response is checked against a reference
computed by a single call before the load: ids, scores and order. The queue bound is set
to exactly what 64 clients can have queued at once (64 x 8 documents), so the run must see
no RESOURCE_EXHAUSTED, and /metrics, sampled throughout, must show the queue within the
bound and, at the end, exactly the calls the test sent.

The issue asks for 64 x 500 calls, the default here. On a 2-core machine shared with other
jobs that took 183 s of load (193 s in all, ~175 calls/s); `RERANKD_LOAD_CALLS` sets the
per-client count (e.g. 100 for a quick local run).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from rerankd import RerankClient, hybrid_search
from rerankd.connectors.qdrant import QdrantConnector
from rerankd.sample import sample_queries
from rerankd.server.process import SidecarProcess
from tests.integration.sidecars import (
    COLLECTION,
    Expected,
    HitsRef,
    MetricsSampler,
    RerankCase,
    WallClock,
    check_hits,
    check_rerank,
    count_delta,
    env_int,
    hits_ref,
    percentile,
    reference,
    requests_by_code,
    run_threads,
    running_sidecar,
    sample_cases,
    sample_qdrant,
    scrape,
    serve_args,
)

pytestmark = pytest.mark.slow

CLIENTS = 64
CALLS = env_int("RERANKD_LOAD_CALLS", 500)  # per client: the full size
HYBRID_EVERY = 8  # every 8th call of a client is a hybrid_search ...
TEXT_EVERY = 4  # ... and every 4th of those embeds its text query through the sidecar
MAX_DOCS = 8  # documents per rerank call and candidates per search, at most
QUEUE_BOUND = CLIENTS * MAX_DOCS  # the most pairs 64 one-call-at-a-time clients can queue
N_CASES = 48
CALL_TIMEOUT = 60.0  # per call; generous, the clock below is what bounds the test
# Measured here: ~170 mixed calls/s on 2 shared cores; the cap allows ~3x slower.
WALL_CAP = 120.0 + CLIENTS * CALLS * 0.02


@dataclass
class Tally:
    """What the clients did, merged across threads under a lock."""

    rerank: int = 0
    search_vector: int = 0
    search_text: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if kind == "rerank":
                self.rerank += 1
            elif kind == "search_vector":
                self.search_vector += 1
            else:
                self.search_text += 1
            self.latencies.append(seconds)
            if error is not None:
                self.errors.append(error)

    @property
    def calls(self) -> int:
        return self.rerank + self.search_vector + self.search_text


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProcess]:
    args = serve_args("--max-queued-pairs", str(QUEUE_BOUND), "--max-documents", "64")
    with running_sidecar(args) as proc:
        yield proc
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def qdrant(sidecar: SidecarProcess) -> QdrantConnector:
    with RerankClient(sidecar.address, timeout=120) as client:
        return sample_qdrant(client)


@pytest.mark.timeout(WALL_CAP + 300)  # setup and references too; the clock fails first
def test_64_clients_mixed_load_every_answer_correct(
    sidecar: SidecarProcess, qdrant: QdrantConnector
) -> None:
    cases = sample_cases(N_CASES, max_docs=MAX_DOCS)
    queries = sample_queries()
    search_kw = {"connector": qdrant, "top_k": MAX_DOCS, "candidates": MAX_DOCS}
    with RerankClient(sidecar.address, timeout=CALL_TIMEOUT, retries=0) as ref_client:
        refs: list[Expected] = [reference(ref_client, c) for c in cases]
        vectors = {q: ref_client.embed([q]).dense[0].tolist() for q in queries}
        text_refs: dict[str, HitsRef] = {}
        vector_refs: dict[str, HitsRef] = {}
        for q in queries:
            by_text = hybrid_search(COLLECTION, q, client=ref_client, fail_open=False, **search_kw)
            by_vector = hybrid_search(
                COLLECTION,
                vectors[q],
                query_text=q,
                mode="dense",
                client=ref_client,
                fail_open=False,
                **search_kw,
            )
            text_refs[q], vector_refs[q] = hits_ref(by_text), hits_ref(by_vector)

    tally = Tally()
    clock = WallClock(WALL_CAP, f"load of {CLIENTS} x {CALLS} calls")

    def client_loop(w: int) -> Callable[[], None]:
        def run() -> None:
            with RerankClient(sidecar.address, timeout=CALL_TIMEOUT, retries=0) as client:
                for k in range(CALLS):
                    if clock.expired():
                        tally.add("rerank", 0.0, f"client {w}: stopped at call {k} by the cap")
                        return
                    i = w * CALLS + k
                    kind, check = one_call(client, i, k)
                    t0 = time.perf_counter()
                    error = None
                    try:
                        check()
                    except Exception as exc:  # every failure is counted, none stops the run
                        error = f"client {w} call {k} ({kind}): {type(exc).__name__}: {exc}"
                    tally.add(kind, time.perf_counter() - t0, error)

        return run

    def one_call(client: RerankClient, i: int, k: int) -> tuple[str, Callable[[], None]]:
        if k % HYBRID_EVERY == HYBRID_EVERY - 1:
            q = queries[i % len(queries)]
            if (k // HYBRID_EVERY) % TEXT_EVERY == 0:

                def by_text() -> None:
                    res = hybrid_search(COLLECTION, q, client=client, fail_open=False, **search_kw)
                    check_hits(res, text_refs[q])

                return "search_text", by_text

            def by_vector() -> None:
                res = hybrid_search(
                    COLLECTION,
                    vectors[q],
                    query_text=q,
                    mode="dense",
                    client=client,
                    fail_open=False,
                    **search_kw,
                )
                check_hits(res, vector_refs[q])

            return "search_vector", by_vector
        case: RerankCase = cases[i % len(cases)]

        def rerank() -> None:
            resp = client.rerank(case.query, list(case.docs), top_n=case.top_n)
            check_rerank(resp, case, refs[i % len(cases)])

        return "rerank", rerank

    before = scrape(sidecar)
    with MetricsSampler(sidecar, interval=0.1) as sampler:
        raised = run_threads([client_loop(w) for w in range(CLIENTS)], clock, "load-client")
    wall = clock.elapsed()
    after = scrape(sidecar)

    assert not raised, raised[:3]
    p50, p99 = percentile(tally.latencies, 50) * 1e3, percentile(tally.latencies, 99) * 1e3
    print(
        f"\nload: {CLIENTS} clients x {CALLS} calls = {tally.calls} calls "
        f"({tally.rerank} rerank, {tally.search_vector} hybrid_search with a vector, "
        f"{tally.search_text} hybrid_search embedding its text), {len(tally.errors)} errors, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {wall:.1f} s ({tally.calls / wall:.0f} calls/s); "
        f"queue max {sampler.max_queued:.0f} pairs (bound {QUEUE_BOUND}) "
        f"over {sampler.scrapes} /metrics scrapes"
    )
    assert not tally.errors, f"{len(tally.errors)} errors, first: {tally.errors[:5]}"
    assert tally.calls == CLIENTS * CALLS

    # The queue stayed bounded: sampled throughout, and no call was refused for it.
    assert not sampler.errors, sampler.errors
    assert sampler.scrapes >= 3, "the load ended before /metrics could be sampled"
    assert sampler.max_queued <= QUEUE_BOUND
    # /metrics during the run counted calls as they finished, and at the end exactly the
    # calls the test sent: every search reranked once, every text search embedded once.
    seen = [
        v - requests_by_code(before, "grpc", "rerank").get("OK", 0.0) for v in sampler.rerank_ok
    ]
    assert all(a <= b for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] > 0
    sent_rerank = tally.rerank + tally.search_vector + tally.search_text
    rerank_delta = count_delta(
        requests_by_code(after, "grpc", "rerank"), requests_by_code(before, "grpc", "rerank")
    )
    assert rerank_delta == {"OK": sent_rerank}
    assert seen[-1] <= sent_rerank
    embed_delta = count_delta(
        requests_by_code(after, "grpc", "embed"), requests_by_code(before, "grpc", "embed")
    )
    assert embed_delta == {"OK": tally.search_text}
