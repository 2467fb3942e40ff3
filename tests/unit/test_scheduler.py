"""Scheduler: packing under a token budget, routing scores back, deadlines, backpressure."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rerankd.engine.backends.base import Backend, BackendInfo
from rerankd.engine.scheduler import Scheduler, SchedulerConfig, pack
from rerankd.engine.tokenize import EncodedPair
from rerankd.errors import DeadlineExceededError, OverloadedError, RerankdError


class SumBackendDouble(Backend):
    """Test double: a pair's 'logit' is the sum of its real (unpadded) token ids.

    That makes every score a function of its own pair only, so any mis-routing between
    requests or any padding leak shows up as a wrong number. `gate` lets a test hold the
    worker inside a batch to build up a queue deterministically.
    """

    info = BackendInfo("double", "fp32", "cpu")

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (rows, width)
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.depths: list[int | None] = []

    def score(self, batch: dict[str, np.ndarray], depth: int | None = None) -> np.ndarray:
        self.entered.set()
        self.depths.append(depth)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.batches.append(batch["input_ids"].shape)
        return (batch["input_ids"] * batch["attention_mask"]).sum(axis=1).astype(np.float32)


def pair(*ids: int) -> EncodedPair:
    arr = np.asarray(ids, dtype=np.int64)
    return EncodedPair(arr, np.zeros_like(arr))


def test_pack_respects_budget_and_covers_all() -> None:
    lengths = [5, 100, 7, 64, 64, 3, 250, 12]
    batches = pack(lengths, max_tokens=256, max_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * width <= 256
    # longest first: each batch's width is non-increasing across batches
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_pack_oversized_pair_gets_its_own_batch() -> None:
    assert pack([1000, 2], max_tokens=64, max_size=8) == [[0], [1]]


def test_scores_are_routed_to_their_own_requests() -> None:
    backend = SumBackendDouble()
    sched = Scheduler(backend, pad_id=0, config=SchedulerConfig(max_batch_tokens=64), name="t")
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(20):
        pairs = [
            pair(*rng.integers(1, 50, size=rng.integers(1, 30))) for _ in range(rng.integers(1, 12))
        ]
        jobs.append((pairs, sched.submit(pairs)))
    for pairs, fut in jobs:
        res = fut.result(timeout=10)
        np.testing.assert_array_equal(res.scores, [p.input_ids.sum() for p in pairs])
        assert res.tokens == sum(len(p) for p in pairs)
    sched.close()
    assert all(rows * width <= 64 or rows == 1 for rows, width in backend.batches)


def test_concurrent_requests_are_pooled_into_shared_batches() -> None:
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    sched = Scheduler(backend, 0, SchedulerConfig(max_batch_tokens=10_000, max_batch_size=64), "t")
    first = sched.submit([pair(1, 2)])
    assert backend.entered.wait(5)  # worker now holds the first batch
    later = [sched.submit([pair(i, i)]) for i in range(1, 9)]
    backend.gate.set()
    assert first.result(5).scores[0] == 3
    for i, fut in enumerate(later, 1):
        assert fut.result(5).scores[0] == 2 * i
    sched.close()
    # the 8 requests queued behind the first ran as one batch
    assert backend.batches[1] == (8, 2)


def test_expired_work_is_dropped_before_compute() -> None:
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    sched = Scheduler(backend, 0, SchedulerConfig(), "t")
    blocker = sched.submit([pair(1)])
    assert backend.entered.wait(5)
    expired = sched.submit([pair(7, 7)], deadline=time.monotonic() - 1)
    backend.gate.set()
    blocker.result(5)
    with pytest.raises(DeadlineExceededError):
        expired.result(5)
    sched.close()
    assert len(backend.batches) == 1  # nothing computed for the expired job


def test_full_queue_answers_overloaded() -> None:
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    sched = Scheduler(backend, 0, SchedulerConfig(max_queued_pairs=4), "t")
    sched.submit([pair(1)])
    assert backend.entered.wait(5)
    sched.submit([pair(1)] * 3)
    with pytest.raises(OverloadedError, match="queue is full"):
        sched.submit([pair(1)] * 2)
    backend.gate.set()
    sched.close()


def test_backend_failure_fails_jobs_not_the_worker() -> None:
    class Failing(SumBackendDouble):
        calls = 0

        def score(self, batch, depth=None):  # type: ignore[override]
            Failing.calls += 1
            if Failing.calls == 1:
                raise RuntimeError("boom")
            return super().score(batch, depth)

    sched = Scheduler(Failing(), 0, SchedulerConfig(), "t")
    with pytest.raises(Exception, match="inference failed: boom"):
        sched.submit([pair(1)]).result(5)
    assert sched.submit([pair(2, 3)]).result(5).scores[0] == 5
    sched.close()


def test_close_drains_queued_work() -> None:
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    sched = Scheduler(backend, 0, SchedulerConfig(), "t")
    futs = [sched.submit([pair(i)]) for i in range(1, 4)]
    assert backend.entered.wait(5)
    closer = threading.Thread(target=sched.close)
    closer.start()
    backend.gate.set()
    closer.join(10)
    assert [f.result(0).scores[0] for f in futs] == [1, 2, 3]


def test_jobs_at_different_depths_never_share_a_batch() -> None:
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    sched = Scheduler(backend, 0, SchedulerConfig(max_batch_size=64), "t")
    blocker = sched.submit([pair(1)])
    assert backend.entered.wait(5)
    shallow = [sched.submit([pair(i)], depth=2) for i in range(1, 4)]
    full = [sched.submit([pair(i)]) for i in range(1, 4)]
    backend.gate.set()
    blocker.result(5)
    assert [f.result(5).scores[0] for f in shallow + full] == [1, 2, 3, 1, 2, 3]
    sched.close()
    assert sorted(backend.depths[1:], key=str) == [2, None]
    assert backend.batches[1:] == [(3, 1), (3, 1)]


def test_pack_min_batches_splits_a_small_request() -> None:
    lengths = [10, 9, 8, 7, 6]
    batches = pack(lengths, max_tokens=10_000, max_size=32, min_batches=2)
    assert [len(b) for b in batches] == [3, 2]
    assert sorted(i for b in batches for i in b) == list(range(5))
    # a budget that already splits finer is left alone
    assert len(pack(lengths, max_tokens=20, max_size=32, min_batches=2)) == 3


class ParallelBackendDouble(SumBackendDouble):
    """Test double taking two batches at once: each call waits at a two-party barrier, so a
    scheduler that ran batches one at a time would time out instead of passing."""

    parallel_batches = 2

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=5)
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def score(self, batch, depth=None):  # type: ignore[override]
        with self.lock:
            self.threads.add(threading.current_thread().name)
        self.barrier.wait()
        return super().score(batch, depth)


def test_parallel_backend_runs_batches_at_once_and_routes_scores() -> None:
    backend = ParallelBackendDouble()
    sched = Scheduler(backend, 0, SchedulerConfig(max_batch_size=64), "t")
    pairs = [pair(i, i + 1) for i in range(1, 7)]
    res = sched.submit(pairs).result(10)
    np.testing.assert_array_equal(res.scores, [2 * i + 1 for i in range(1, 7)])
    sched.close()
    assert len(backend.batches) == 2  # six pairs split for the two workers
    assert len(backend.threads) == 2
    assert res.inference_s >= 0


def test_parallel_backend_failure_fails_the_round_and_keeps_serving() -> None:
    class Failing(ParallelBackendDouble):
        def score(self, batch, depth=None):  # type: ignore[override]
            if batch["input_ids"][0, 0] == 99:
                raise RuntimeError("boom")
            return SumBackendDouble.score(self, batch, depth)

    sched = Scheduler(Failing(), 0, SchedulerConfig(), "t")
    with pytest.raises(Exception, match="inference failed: boom"):
        sched.submit([pair(99), pair(1)]).result(5)
    assert sched.submit([pair(2, 3), pair(4)]).result(5).scores.tolist() == [5, 4]
    sched.close()


def test_workers_left_running_are_stopped_at_interpreter_exit() -> None:
    """The exit hook stops a worker its caller never closed, failing (not computing) what
    is still queued, and forgets schedulers that were closed."""
    from rerankd.engine import scheduler as mod

    closed = Scheduler(SumBackendDouble(), 0, SchedulerConfig(), "closed")
    closed.close()
    assert closed not in mod._LIVE
    backend = SumBackendDouble()
    backend.gate = threading.Event()
    left = Scheduler(backend, 0, SchedulerConfig(), "left")
    running = left.submit([pair(1)])
    assert backend.entered.wait(5)
    queued = left.submit([pair(2)])
    hook = threading.Thread(target=mod._close_at_exit)
    hook.start()
    backend.gate.set()
    hook.join(10)
    assert not hook.is_alive() and not left._thread.is_alive()
    assert running.result(0).scores[0] == 1
    with pytest.raises(RerankdError, match="shut down"):
        queued.result(0)
    assert left not in mod._LIVE
