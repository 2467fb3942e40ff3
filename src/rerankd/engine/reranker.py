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
from rerankd.engine.cache import CacheConfig, ScoreCache
from rerankd.engine.fusion import UNFITTED, FusionParams, fuse
from rerankd.engine.limits import Limits, resolve_keep_schedule, validate_rerank
from rerankd.engine.model_meta import read_meta
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.scheduler import JobResult, Scheduler, SchedulerConfig
from rerankd.engine.tokenize import EncodedRequest, PairEncoder
from rerankd.errors import InvalidInputError, ModelLoadError
from rerankd.types import (
    Document,
    Fusion,
    LongDocs,
    Normalization,
    RerankOptions,
    RerankResponse,
    RerankResult,
    Timings,
)

log = logging.getLogger(__name__)

#: Tokens per pair when neither the request, the server nor the model says otherwise.
DEFAULT_MAX_LENGTH = 512
# Tokens consecutive windows of a long document share, so no passage is cut at a seam.
DEFAULT_WINDOW_OVERLAP = 32


def model_max_length(folder: Path, config: ModelConfig) -> int:
    """The model's own serving default: the length it was trained on, else 512.

    A cross-encoder fine-tuned on 192-token pairs scores 512-token pairs worse (a relevant
    passage is diluted by text it never saw at that length), so rerankd's trainer records
    `max_length` in `rerankd.json` and serving starts from it. Always capped by the
    position table.
    """
    value = read_meta(folder).get("max_length", 0)
    trained = value if isinstance(value, int) and value > 0 else 0
    return min(trained or DEFAULT_MAX_LENGTH, config.max_length)


def model_long_docs(folder: Path) -> LongDocs:
    """The model's own default for documents longer than one window: how it was trained.

    rerankd's trainer reads each training document's first window only, so the models it
    writes say `"long_docs": "truncate"` in `rerankd.json`: scored by their best window
    instead, they meet text they never trained on (a window starting mid-abstract, without
    the title), and a shallow depth cut ranks such windows worst (on SciFact the shipped
    model's depth 2 loses a quarter of its NDCG@10 to it). Any other model reads the whole
    document (MAX). A request's own `long_docs` always wins.
    """
    value = read_meta(folder).get("long_docs", LongDocs.MAX.value)
    try:
        return LongDocs(value)
    except ValueError:
        raise ModelLoadError(
            f"{folder / 'rerankd.json'}: long_docs must be one of "
            f"{[v.value for v in LongDocs]}, got {value!r}"
        ) from None


@dataclass
class PreparedRequest:
    """A request ready to score: the pairs to compute and the scores already known.

    `todo[j]` is the request index of the j-th encoded document; `known` holds cached
    scores by request index; `keys` are the cache keys of every document (empty when the
    cache is off).
    """

    encoded: EncodedRequest
    todo: list[int]
    known: dict[int, float]
    keys: list[bytes]
    total: int
    depth: int | None
    keep: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RerankerInfo:
    name: str
    source: str
    config: ModelConfig
    backend: str
    precision: str
    device: str
    default_max_length: int
    default_long_docs: LongDocs


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
        default_max_length: int = 0,
        cache: CacheConfig | None = None,
        fingerprint: str = "",
    ) -> None:
        self.name = name
        self.source = source
        self.folder = folder
        self.config = config
        self.encoder = encoder
        self.backend = backend
        self.limits = limits or Limits()
        #: tokens per pair when a request sends max_length 0 (0 here = the model's own)
        self.default_max_length = min(
            default_max_length or model_max_length(folder, config), config.max_length
        )
        #: how a request that does not say scores a long document (`model_long_docs`)
        self.default_long_docs = model_long_docs(folder)
        self.cache = ScoreCache(cache or CacheConfig())
        self.fingerprint = fingerprint or str(folder)
        #: fitted fusion with the first-stage order (`fusion.json`), if the model ships one
        self.fusion = FusionParams.load(folder)
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
            self.default_long_docs,
        )

    def validate(
        self, query: str, documents: list[Document], top_n: int, options: RerankOptions
    ) -> None:
        validate_rerank(
            query,
            documents,
            top_n,
            options,
            self.limits,
            self.config.max_length,
            self.config.num_layers,
        )
        if self.keep_schedule(options) and not self.supports_pruning:
            raise InvalidInputError(
                f"model {self.name!r} ({self.config.family}, {self.backend.info.name} backend) "
                "does not prune tokens; drop keep_schedule/keep_ratio or serve a BERT-family "
                "model with --backend torch"
            )

    @property
    def supports_pruning(self) -> bool:
        return self.config.family != "jina" and self.backend.supports_pruning

    def keep_schedule(self, options: RerankOptions) -> tuple[float, ...]:
        return resolve_keep_schedule(options, options.depth or self.config.num_layers)

    def _full_configuration(self, options: RerankOptions, schedule: tuple[float, ...]) -> bool:
        """Whether a request (with its resolved keep `schedule`) runs the configuration the
        fusion was fitted on: every layer, no token pruning (`rerankd.engine.fusion`: other
        configurations keep the first-stage order under fusion)."""
        full_depth = options.depth in (0, self.config.num_layers)
        return full_depth and all(r >= 1.0 for r in schedule)

    def encode(
        self, query: str, documents: list[Document], options: RerankOptions
    ) -> PreparedRequest:
        """Look up cached scores, tokenize the rest (CPU-bound: run off the event loop)."""
        known: dict[int, float] = {}
        keys: list[bytes] = []
        if self.cache.enabled:
            keys = self.cache.keys(self._cache_scope(options), query, [d.text for d in documents])
            known = self.cache.get_many(keys)
        todo = [i for i in range(len(documents)) if i not in known]
        encoded = self.encoder.encode(
            query,
            [documents[i].text for i in todo],
            options.max_length or self.default_max_length,
            windows=self.long_docs(options) == LongDocs.MAX,
            overlap=options.window_overlap or DEFAULT_WINDOW_OVERLAP,
            max_doc_tokens=options.max_doc_tokens or self.limits.max_doc_tokens,
        )
        return PreparedRequest(
            encoded,
            todo,
            known,
            keys,
            len(documents),
            options.depth or None,
            self.keep_schedule(options) or None,
        )

    def long_docs(self, options: RerankOptions) -> LongDocs:
        """The request's `long_docs`, else the model's."""
        return options.long_docs or self.default_long_docs

    def _cache_scope(self, options: RerankOptions) -> str:
        """Everything a raw score depends on besides the query and document text."""
        return "|".join(
            str(x)
            for x in (
                self.name,
                self.fingerprint,
                options.max_length or self.default_max_length,
                options.depth or self.config.num_layers,
                self.long_docs(options).value,
                options.window_overlap or DEFAULT_WINDOW_OVERLAP,
                options.max_doc_tokens or self.limits.max_doc_tokens,
                self.keep_schedule(options),
            )
        )

    def submit(self, prepared: PreparedRequest, deadline: float | None) -> Future[JobResult]:
        """Queue for scoring; the future yields one raw score per document of the request.

        Windows of a long document fold into its maximum; cached scores fill in the rest,
        and fresh scores are stored in the cache.
        """
        enc = prepared.encoded
        outer: Future[JobResult] = Future()

        def fold(done: Future[JobResult]) -> None:
            if not outer.set_running_or_notify_cancel():
                return  # the caller gave up (e.g. its RPC was cancelled): nothing to deliver
            exc = done.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            res = done.result()
            fresh = np.full(len(prepared.todo), -np.inf, dtype=np.float32)
            if enc.pairs:
                np.maximum.at(fresh, np.asarray(enc.owners), res.scores)
            scores = np.empty(prepared.total, dtype=np.float32)
            scores[prepared.todo] = fresh
            for i, v in prepared.known.items():
                scores[i] = v
            if prepared.keys:
                fresh_items = [
                    (prepared.keys[i], float(fresh[j])) for j, i in enumerate(prepared.todo)
                ]
                self.cache.put_many(fresh_items)
            outer.set_result(
                JobResult(scores, res.queue_s, res.inference_s, res.tokens, len(prepared.known))
            )

        inner = self.scheduler.submit(enc.pairs, deadline, depth=prepared.depth, keep=prepared.keep)
        inner.add_done_callback(fold)
        return outer

    def finish(
        self,
        documents: list[Document],
        result: JobResult,
        top_n: int,
        options: RerankOptions,
        tokenize_s: float,
    ) -> RerankResponse:
        """Normalise, fuse if asked, sort best first (stable on ties: earlier documents
        first), cut to top_n."""
        raw = result.scores.astype(np.float64)
        scores = raw
        if options.normalization == Normalization.SIGMOID:
            scores = 1.0 / (1.0 + np.exp(-raw))
        ranking, weight = scores, 0.0
        schedule = self.keep_schedule(options)
        if options.fusion == Fusion.AUTO and self.fusion is not None:
            fitted = self._full_configuration(options, schedule)
            ranking, weight = fuse(raw, self.fusion if fitted else UNFITTED)
        order = np.argsort(-ranking, kind="stable")
        if top_n:
            order = order[:top_n]
        results = [
            RerankResult(
                index=int(i),
                id=documents[i].id,
                score=float(ranking[i]),
                text=documents[i].text if options.return_documents else None,
                model_score=float(scores[i]),
            )
            for i in order
        ]
        return RerankResponse(
            results=results,
            model=self.name,
            tokens=result.tokens,
            cache_hits=result.cache_hits,
            depth=options.depth or self.config.num_layers,
            keep_schedule=schedule,
            fusion_weight=weight,
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
        encoded = self.encode(query, documents, options)
        tokenize_s = time.perf_counter() - t0
        result = self.submit(encoded, deadline).result()
        return self.finish(documents, result, top_n, options, tokenize_s)

    def warmup(self) -> None:
        """Run one small batch so the first real request does not pay graph setup."""
        docs = [Document(str(i), "warm up " * (4 << i)) for i in range(3)]
        self.rerank("warm up", docs)

    def close(self, drain: bool = True) -> None:
        self.scheduler.close(drain=drain)
        self.backend.close()
