"""Prometheus metrics for one sidecar, shared by the gRPC and HTTP transports.

Every `Metrics` owns its own `CollectorRegistry` rather than the process-wide default, so
several sidecars in one process (tests, embedded use) never collide on metric names.

What is exported, and why it is shaped so:

- `rerankd_requests_total{transport,method,code}`: one count per finished call. `method`
  is the same word on both transports (`rerank`, `embed`, `list_models`) so dashboards
  can sum across them; `code` is the gRPC status name (`OK`, `INVALID_ARGUMENT`, ...) on
  gRPC and the HTTP status (`200`, `400`, ...) on HTTP, i.e. what each client saw.
- `rerankd_request_duration_seconds{transport,method}`: latency histogram, every outcome.
- `rerankd_inflight_requests{transport}`: calls being served now (a scale-out signal).
- `rerankd_queued_pairs{model}`: pairs waiting in each model's scheduler, read at scrape
  time from `Scheduler.queued_pairs`, so the engine needs no hook for it.
- `rerankd_batch_size{model}` / `rerankd_batch_duration_seconds{model}`: pairs per
  inference batch and time per batch; how well cross-request batching is working.
- `rerankd_tokens_total{method,model}`: tokens computed (the unit of cost).
- `rerankd_cache_hits_total`: scores served from the score cache (`--cache-entries`).
- `rerankd_ready`: 1 while models are loaded and the sidecar accepts work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from rerankd.engine.reranker import Reranker

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _QueueCollector(Collector):
    """Reads each model's scheduler queue at scrape time: always current, no hook needed."""

    def __init__(self, models: Callable[[], Mapping[str, Reranker]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rerankd_queued_pairs",
            "(query, document) pairs waiting in a model's scheduler queue",
            labels=["model"],
        )
        for name, model in self._models().items():
            family.add_metric([name], model.scheduler.queued_pairs)
        yield family

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would call collect() at registration time.
        yield GaugeMetricFamily(
            "rerankd_queued_pairs", "(query, document) pairs waiting", labels=["model"]
        )


class _MeteredBackend:
    """Wraps a scheduler's backend to observe every batch it scores.

    The scheduler calls `backend.score(batch, ...)` once per inference batch from its
    worker thread; wrapping that call gives batch sizes and batch latency without a hook
    in the engine. Everything else is delegated unchanged.
    """

    def __init__(self, inner: Any, size: Histogram, seconds: Histogram) -> None:
        self._inner = inner
        self._size = size
        self._seconds = seconds

    def score(self, batch: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        scores = self._inner.score(batch, *args, **kwargs)
        self._seconds.observe(time.perf_counter() - t0)
        self._size.observe(len(batch["input_ids"]))
        return scores

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Metrics:
    """The sidecar's metrics; both transports record into one instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rerankd_requests",
            "Finished calls by transport, method and status code",
            ["transport", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "rerankd_request_duration_seconds",
            "Time from request received to response ready",
            ["transport", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "rerankd_inflight_requests", "Calls being served now", ["transport"], registry=r
        )
        self.tokens = Counter(
            "rerankd_tokens",
            "Tokens computed, by method and model",
            ["method", "model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "rerankd_cache_hits", "Scores served from the score cache", registry=r
        )
        self.batch_size = Histogram(
            "rerankd_batch_size",
            "Pairs per inference batch",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "rerankd_batch_duration_seconds",
            "Inference time per batch",
            ["model"],
            buckets=BATCH_SECONDS_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("rerankd_ready", "1 while models are loaded and serving", registry=r)
        self._models: Mapping[str, Reranker] = {}
        r.register(_QueueCollector(lambda: self._models))

    def watch(self, rerankers: Mapping[str, Reranker]) -> None:
        """Start reporting queue depth and batches for these (loaded, warmed) models."""
        self._models = rerankers
        for name, model in rerankers.items():
            scheduler = model.scheduler
            if not isinstance(scheduler.backend, _MeteredBackend):
                scheduler.backend = _MeteredBackend(  # type: ignore[assignment]
                    scheduler.backend,
                    self.batch_size.labels(name),
                    self.batch_seconds.labels(name),
                )

    def observe_request(self, transport: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(transport, method, code).inc()
        self.latency.labels(transport, method).observe(seconds)

    def add_tokens(self, method: str, model: str, tokens: int) -> None:
        if tokens:
            self.tokens.labels(method, model).inc(tokens)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
