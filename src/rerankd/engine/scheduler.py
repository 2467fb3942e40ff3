"""Cross-request dynamic batching for one model.

Callers submit a job (the encoded pairs of one request) and get a Future. One worker
thread drains whatever jobs are queued, drops those whose deadline has passed, sorts all
their pairs by length and packs them into batches under a token budget (padding is paid
per batch, so similar lengths together waste little), runs the backend and routes each
score back to its job. A job resolves as soon as its last pair is scored.

A backend that takes several batches at once (`Backend.parallel_batches`, e.g. ONNX Runtime
with one single-threaded run per core) gets a round's batches from a pool of that many
threads; routing stays on the worker thread. Why: small BERT ops pay for every cross-thread
hand-off. On two cores, in interleaved A/Bs on the same batches (MiniLM-L6 and TinyBERT-L2,
int8), two single-threaded runs took 5-9% less time than one two-threaded run in one hour
and 26-35% less in another, never more; through the sidecar, single-client pairs/s rose
from 138 to 189 (MiniLM-L6) and from 1,243 to 1,876 (TinyBERT-L2) (bench/README.md).

The queue is bounded in pairs: a submit that would exceed it raises `OverloadedError`
at once (backpressure), rather than letting latency grow without bound.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from rerankd.engine.backends.base import Backend
from rerankd.engine.tokenize import EncodedPair, collate
from rerankd.errors import DeadlineExceededError, OverloadedError, RerankdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits. Tokens are counted with padding: batch size x longest pair."""

    max_batch_tokens: int = 1024
    max_batch_size: int = 32
    max_queued_pairs: int = 8192


@dataclass
class JobResult:
    """Scores in submission order and where the job's time went (seconds)."""

    scores: np.ndarray
    queue_s: float
    #: from the job's first batch starting to its last batch ending (batches that other
    #: jobs' pairs shared, or that ran in parallel, count once)
    inference_s: float
    tokens: int
    cache_hits: int = 0


@dataclass
class _Job:
    pairs: list[EncodedPair]
    deadline: float | None
    future: Future[JobResult]
    enqueued: float
    variant: tuple[int | None, tuple[float, ...] | None] = (None, None)
    scores: np.ndarray = field(init=False)
    remaining: int = field(init=False)
    started: float = 0.0
    #: perf_counter span from this job's first batch starting to its last batch ending
    compute_from: float = float("inf")
    compute_to: float = 0.0

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.pairs), dtype=np.float32)
        self.remaining = len(self.pairs)


def pack(
    lengths: list[int], max_tokens: int, max_size: int, min_batches: int = 1
) -> list[list[int]]:
    """Indices grouped into batches: longest first, each under the padded-token budget.

    A pair longer than the budget on its own still gets a batch of one. With
    `min_batches`, batches hold at most ceil(n / min_batches) pairs, so a small request
    still splits across that many parallel workers.
    """
    if min_batches > 1 and lengths:
        max_size = min(max_size, math.ceil(len(lengths) / min_batches))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_size or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


#: every scheduler whose worker may still run, for `_close_at_exit`
_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Stop every worker a caller left running when the interpreter exits. A worker thread
    that ran torch and is still alive when the C++ runtime tears down aborts the process
    ("terminate called without an active exception", exit code 134): a script that loaded
    a torch reranker and never called `close()` crashed on its way out in one run out of
    two to six on this machine."""
    for scheduler in list(_LIVE):
        scheduler.close(drain=False)


class Scheduler:
    """Pools requests for one backend in a single worker thread."""

    def __init__(self, backend: Backend, pad_id: int, config: SchedulerConfig, name: str) -> None:
        self.backend = backend
        self.pad_id = pad_id
        self.config = config
        self.name = name
        self._queue: deque[_Job] = deque()
        self._queued_pairs = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"rerankd-{name}", daemon=True)
        self.batches_run = 0
        self.workers = max(1, backend.parallel_batches)
        self._pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix=f"rerankd-{name}-batch")
            if self.workers > 1
            else None
        )
        self._thread.start()
        _LIVE.add(self)

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    def submit(
        self,
        pairs: list[EncodedPair],
        deadline: float | None = None,
        depth: int | None = None,
        keep: tuple[float, ...] | None = None,
    ) -> Future[JobResult]:
        """Queue a job; `deadline` is a `time.monotonic()` instant or None.

        Jobs at different `depth`s (None = all layers) or keep schedules (None = no token
        pruning) share the queue but never a batch.
        """
        future: Future[JobResult] = Future()
        if not pairs:
            future.set_result(JobResult(np.zeros(0, np.float32), 0.0, 0.0, 0))
            return future
        with self._cond:
            if self._stopping:
                raise RerankdError(f"model {self.name!r} is shutting down")
            if self._queued_pairs + len(pairs) > self.config.max_queued_pairs:
                raise OverloadedError(
                    f"model {self.name!r} queue is full ({self._queued_pairs} pairs queued, "
                    f"limit {self.config.max_queued_pairs}); retry later or on another replica"
                )
            self._queue.append(_Job(pairs, deadline, future, time.monotonic(), (depth, keep)))
            self._queued_pairs += len(pairs)
            self._cond.notify()
        return future

    def close(self, drain: bool = True) -> None:
        """Stop the worker; with `drain`, queued jobs are computed first, else failed."""
        with self._cond:
            self._stopping = True
            if not drain:
                while self._queue:
                    job = self._queue.popleft()
                    job.future.set_exception(RerankdError(f"model {self.name!r} shut down"))
                self._queued_pairs = 0
            self._cond.notify_all()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        _LIVE.discard(self)

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            jobs = list(self._queue)
            self._queue.clear()
            self._queued_pairs = 0
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._round(jobs)
            except Exception as exc:  # a backend failure fails these jobs, not the server
                log.exception("batch failed for model %s", self.name)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(RerankdError(f"inference failed: {exc}"))

    def _round(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        live: list[_Job] = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up
            if job.deadline is not None and job.deadline <= now:
                job.future.set_exception(
                    DeadlineExceededError("deadline passed while queued; nothing was computed")
                )
                continue
            job.started = now
            live.append(job)
        groups: dict[tuple, list[_Job]] = {}
        for job in live:
            groups.setdefault(job.variant, []).append(job)
        for (depth, keep), group in groups.items():
            self._run_group(group, depth, keep)

    def _run_group(
        self, jobs: list[_Job], depth: int | None, keep: tuple[float, ...] | None
    ) -> None:
        refs = [(job, i) for job in jobs for i in range(len(job.pairs))]
        lengths = [len(job.pairs[i]) for job, i in refs]
        batches = pack(
            lengths, self.config.max_batch_tokens, self.config.max_batch_size, self.workers
        )
        members = ([refs[k] for k in batch] for batch in batches)
        if self._pool is None:
            for batch in members:
                self._route(batch, *self._score(batch, depth, keep))
            return
        pending = {self._pool.submit(self._score, m, depth, keep): m for m in members}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                self._route(pending.pop(fut), *fut.result())

    def _score(
        self,
        members: list[tuple[_Job, int]],
        depth: int | None,
        keep: tuple[float, ...] | None,
    ) -> tuple[np.ndarray | None, float, float]:
        """Scores of one batch and when it started and ended; None if every caller gave up."""
        if all(job.future.done() for job, _ in members):
            return None, 0.0, 0.0
        inputs = collate([job.pairs[i] for job, i in members], self.pad_id, keep is not None)
        t0 = time.perf_counter()
        scores = (
            self.backend.score(inputs, depth=depth)
            if keep is None
            else self.backend.score_pruned(inputs, keep)
        )
        return scores, t0, time.perf_counter()

    def _route(
        self, members: list[tuple[_Job, int]], scores: np.ndarray | None, t0: float, t1: float
    ) -> None:
        """Hand a batch's scores to their jobs; resolve each job whose last pair this was."""
        if scores is None:
            return
        self.batches_run += 1
        for (job, i), score in zip(members, scores, strict=True):
            job.scores[i] = score
            job.remaining -= 1
        for job in {id(j): j for j, _ in members}.values():
            job.compute_from = min(job.compute_from, t0)
            job.compute_to = max(job.compute_to, t1)
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(
                    JobResult(
                        job.scores,
                        queue_s=job.started - job.enqueued,
                        inference_s=job.compute_to - job.compute_from,
                        tokens=sum(len(p) for p in job.pairs),
                    )
                )
