"""A loaded cross-encoder: tokenizer + backend + scheduler, and the rerank logic around them.

`Reranker.rerank` is the whole path for in-process callers; the server uses the same
steps (`validate` -> `encode` -> `submit` -> `finish`) so tokenisation can run off its
event loop while scoring happens in the scheduler's thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rerankd.engine.backends.base import Backend
from rerankd.engine.limits import Limits, validate_rerank
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.scheduler import JobResult, Scheduler, SchedulerConfig
from rerankd.engine.tokenize import EncodedPair, PairEncoder
from rerankd.types import (
    Document,
    Normalization,
    RerankOptions,
    RerankResponse,
    RerankResult,
    Timings,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class RerankerInfo:
    name: str
    source: str
    config: ModelConfig
    backend: str
    precision: str
    device: str
    default_max_length: int


class Reranker:
    """One served cross-encoder."""

    def __init__(
        self,
        name: str,
        source: str,
        folder: Path,
        config: ModelConfig,
        encoder: PairEncoder,
        backend: Backend,
        *,
        scheduler: SchedulerConfig | None = None,
        limits: Limits | None = None,
        default_max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        self.name = name
        self.source = source
        self.folder = folder
        self.config = config
        self.encoder = encoder
        self.backend = backend
        self.limits = limits or Limits()
        self.default_max_length = min(default_max_length, config.max_length)
        self.scheduler = Scheduler(
            backend, config.pad_token_id, scheduler or SchedulerConfig(), name
        )

    @property
    def info(self) -> RerankerInfo:
        b = self.backend.info
        return RerankerInfo(
            self.name,
            self.source,
            self.config,
            b.name,
            b.precision,
            b.device,
            self.default_max_length,
        )

    def validate(
        self, query: str, documents: list[Document], top_n: int, options: RerankOptions
    ) -> None:
        validate_rerank(query, documents, top_n, options, self.limits, self.config.max_length)

    def encode(
        self, query: str, documents: list[Document], options: RerankOptions
    ) -> list[EncodedPair]:
        max_length = options.max_length or self.default_max_length
        return self.encoder.encode(query, [d.text for d in documents], max_length)

    def submit(self, pairs: list[EncodedPair], deadline: float | None) -> Future[JobResult]:
        return self.scheduler.submit(pairs, deadline)

    def finish(
        self,
        documents: list[Document],
        result: JobResult,
        top_n: int,
        options: RerankOptions,
        tokenize_s: float,
    ) -> RerankResponse:
        """Normalise, sort best first (stable on ties: earlier documents first), cut to top_n."""
        scores = result.scores.astype(np.float64)
        if options.normalization == Normalization.SIGMOID:
            scores = 1.0 / (1.0 + np.exp(-scores))
        order = np.argsort(-scores, kind="stable")
        if top_n:
            order = order[:top_n]
        results = [
            RerankResult(
                index=int(i),
                id=documents[i].id,
                score=float(scores[i]),
                text=documents[i].text if options.return_documents else None,
            )
            for i in order
        ]
        return RerankResponse(
            results=results,
            model=self.name,
            tokens=result.tokens,
            timings=Timings(
                queue_us=int(result.queue_s * 1e6),
                tokenize_us=int(tokenize_s * 1e6),
                inference_us=int(result.inference_s * 1e6),
            ),
        )

    def rerank(
        self,
        query: str,
        documents: list[Document],
        top_n: int = 0,
        options: RerankOptions | None = None,
        timeout: float | None = None,
    ) -> RerankResponse:
        """Validate, encode, score (batched with any concurrent callers) and sort."""
        options = options or RerankOptions()
        self.validate(query, documents, top_n, options)
        deadline = time.monotonic() + timeout if timeout else None
        t0 = time.perf_counter()
        pairs = self.encode(query, documents, options)
        tokenize_s = time.perf_counter() - t0
        result = self.submit(pairs, deadline).result()
        return self.finish(documents, result, top_n, options, tokenize_s)

    def warmup(self) -> None:
        """Run one small batch so the first real request does not pay graph setup."""
        docs = [Document(str(i), "warm up " * (4 << i)) for i in range(3)]
        self.rerank("warm up", docs)

    def close(self, drain: bool = True) -> None:
        self.scheduler.close(drain=drain)
        self.backend.close()
